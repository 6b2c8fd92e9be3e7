"""PNG figures for runs and evaluations (matplotlib, Agg backend, no display needed).

Each function takes plain arrays / records and a path, writes one PNG atomically and returns
the path. matplotlib is imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fundus_edge.fileio import atomic_write_bytes

__all__ = [
    "plot_faithfulness",
    "plot_map_grid",
    "plot_pr",
    "plot_roc",
    "plot_training_curves",
]


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.0, 5.0)):
    from fundus_edge.errors import require

    matplotlib = require("matplotlib", purpose="PNG plots")

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _curves(y_true, y_prob, label_names, kind: str, path, title: str) -> Path:
    from fundus_edge.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    y_true = np.asarray(y_true) > 0.5
    y_prob = np.asarray(y_prob, dtype=np.float64)
    plt, fig, axes = _figure(size=(7.0, 6.0))
    ax = axes[0, 0]
    import matplotlib

    palette = matplotlib.colormaps["tab20"]

    def colours(j: int):
        return palette(j % 20)

    drawn = 0
    for j, name in enumerate(label_names):
        t = y_true[:, j]
        if t.all() or not t.any():
            continue  # one class: no curve
        if kind == "roc":
            fpr, tpr, _ = roc_curve(t, y_prob[:, j])
            auc = roc_auc_score(t, y_prob[:, j])
            ax.plot(fpr, tpr, lw=1.2, color=colours(j), label=f"{name} {auc:.3f}")
        else:
            prec, rec, _ = precision_recall_curve(t, y_prob[:, j])
            ap = average_precision_score(t, y_prob[:, j])
            ax.step(rec, prec, where="post", lw=1.2, color=colours(j), label=f"{name} {ap:.3f}")
        drawn += 1
    if kind == "roc":
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title if drawn else f"{title} (no label has both classes)")
    if drawn:
        ax.legend(fontsize=7, ncol=2 if drawn > 12 else 1, loc="lower right", framealpha=0.8)
    return _save(plt, fig, path)


def plot_roc(y_true, y_prob, label_names: Sequence[str], path, title: str = "ROC") -> Path:
    """One ROC curve per label with both classes (legend: AUROC)."""
    return _curves(y_true, y_prob, list(label_names), "roc", path, title)


def plot_pr(
    y_true, y_prob, label_names: Sequence[str], path, title: str = "Precision-recall"
) -> Path:
    """One precision-recall curve per label with both classes (legend: AP)."""
    return _curves(y_true, y_prob, list(label_names), "pr", path, title)


def plot_training_curves(records: Sequence[dict], path) -> Path:
    """Loss and validation metrics per epoch from ``metrics.jsonl`` records.

    Uses the keys ``epoch``, ``train_loss``, ``val_loss`` and any of ``val_macro_auroc``,
    ``val_map``, ``val_riadd``, ``val_macro_f1``, ``lr``.
    """
    plt, fig, axes = _figure(1, 2, size=(11.0, 4.0))
    ep = [r["epoch"] for r in records]

    def series(key: str) -> list[float]:
        return [np.nan if r.get(key) is None else float(r[key]) for r in records]

    ax = axes[0, 0]
    for key in ("train_loss", "val_loss"):
        if any(key in r for r in records):
            ax.plot(ep, series(key), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax = axes[0, 1]
    for key in ("val_macro_auroc", "val_map", "val_riadd", "val_macro_f1"):
        if any(key in r for r in records):
            ax.plot(ep, series(key), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.legend()
    return _save(plt, fig, path)


def plot_map_grid(
    images: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    path,
    masks: Sequence[np.ndarray | None] | None = None,
    cols: int = 4,
) -> Path:
    """Grid of images with their class maps overlaid (jet, alpha 0.45), mask outlines in white.

    Args:
        images: uint8 ``(H, W, 3)`` RGB model inputs.
        maps: ``(H, W)`` maps in ``[0, 1]`` (same size as their image).
        titles: one line per tile (label, probability).
        path: output PNG.
        masks: optional ``(H, W)`` 0/1 lesion masks to outline.
        cols: tiles per row.
    """
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    plt, fig, axes = _figure(rows, cols, size=(3.0 * cols, 3.2 * rows))
    for k in range(rows * cols):
        ax = axes[k // cols, k % cols]
        ax.axis("off")
        if k >= len(images):
            continue
        ax.imshow(images[k])
        ax.imshow(np.asarray(maps[k], dtype=np.float32), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        if masks is not None and masks[k] is not None and np.any(masks[k]):
            ax.contour(np.asarray(masks[k], dtype=np.float32), levels=[0.5], colors="white")
        ax.set_title(titles[k], fontsize=8)
    return _save(plt, fig, path)


def plot_faithfulness(curves: dict, macro: dict, path, road: dict | None = None) -> Path:
    """Deletion and insertion curves, one line per map method (macro mean over labels); with
    ``road``, a third panel: ROAD's MoRF and LeRF probability change per removed fraction.

    Args:
        curves: method -> ``{"fraction", "deletion", "insertion"}`` (the report's ``curves``).
        macro: method -> ``{"deletion_auc", "insertion_auc"}`` (and ``road_combined``), for
            the legends.
        path: output PNG.
        road: the report's ``road`` section (``removed_fraction``, ``curves``), or None.
    """
    panels = 3 if road else 2
    plt, fig, axes = _figure(1, panels, size=(5.0 * panels, 4.2))
    styles = {"kernel": "-", "gradcam": "--", "random": ":"}
    for k, (kind, better) in enumerate((("deletion", "lower"), ("insertion", "higher"))):
        ax = axes[0, k]
        for method, c in curves.items():
            auc = macro.get(method, {}).get(f"{kind}_auc")
            label = method if auc is None else f"{method} (AUC {auc:.3f})"
            ax.plot(c["fraction"], c[kind], styles.get(method, "-"), label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the label")
        ax.set_title(f"{kind.capitalize()} (AUC {better} is better)")
        ax.legend(fontsize=8)
    if road:
        ax = axes[0, 2]
        x = road["removed_fraction"]
        for i, (method, c) in enumerate(road["curves"].items()):
            colour = f"C{i}"
            combined = macro.get(method, {}).get("road_combined")
            tail = "" if combined is None else f", combined {combined:.3f}"
            ax.plot(x, c["morf"], "v-", color=colour, label=f"{method} MoRF{tail}")
            ax.plot(x, c["lerf"], "^:", color=colour, label=f"{method} LeRF")
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of pixels imputed (ROAD)")
        ax.set_ylabel("change in probability of the label")
        ax.set_title("ROAD (MoRF lower, LeRF higher is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()  # three panels: keep each y label clear of its left neighbour
    return _save(plt, fig, path)
