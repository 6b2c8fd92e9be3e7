"""Benchmark results as data, then rendered: JSON, Markdown tables, PNG plots.

A result is a :class:`BenchResult` (``to_dict()`` gives the JSON written to
``result.json``; ``schema``/``format`` identify it). Renderers take a result, so a
committed ``bench/results/*.json`` can be re-rendered anywhere without re-running:

* :func:`render_markdown` - a summary table (format, status, size, metric, ms/img, FPS,
  as ``yolo benchmark`` prints), a latency table (min/mean/median/p90/p95/p99/max/std,
  throughput, as trtexec prints), per-stage tables, speed-up ratios, roofline estimates;
* :func:`plot_latency` - median latency per backend and precision, whiskers to p90;
* :func:`plot_distribution` - box plots of every row's raw samples;
* :func:`write_report` - all of the above into one folder, each file written atomically.

``ms/img`` is the median latency divided by the batch; ``FPS`` is the row's throughput
(images per second).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fundus_edge.errors import DataError, UserError, require
from fundus_edge.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from fundus_edge.perf.stats import LatencyStats, Ratio, speedup

__all__ = [
    "RESULT_FORMAT",
    "RESULT_SCHEMA",
    "STATUSES",
    "BenchResult",
    "BenchRow",
    "plot_distribution",
    "plot_latency",
    "read_result",
    "render_markdown",
    "write_report",
]

RESULT_SCHEMA = "fundus-edge-bench"
RESULT_FORMAT = 1
STATUSES = ("ok", "failed", "skipped")


@dataclass
class BenchRow:
    """One benchmarked configuration: a backend at a precision and batch size.

    Attributes:
        backend: e.g. ``"torch"``, ``"onnxruntime-cpu"``, ``"tensorrt"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        batch: images per inference call.
        status: ``"ok"``, ``"failed"`` (``error`` says why) or ``"skipped"``.
        name: unique label within a result; default ``"<backend> <precision> b<batch>"``.
        stats: end-to-end latency of one call.
        stages: per-stage latency (decode/preprocess/infer/... or H2D/compute/D2H).
        samples_ms: the raw per-call latencies (for plots and ratio intervals).
        size_mb: artifact size on disk.
        parity: agreement with a reference, e.g. ``{"reference": "torch fp32",
            "max_abs_diff": 2e-6, "tolerance": 1e-4, "ok": true}``.
        metric: quality on a labelled set, e.g. ``{"name": "macro_auc", "value": 0.91}``.
        memory: :func:`fundus_edge.perf.device.memory_record` output.
        power: :class:`fundus_edge.perf.device.TegrastatsSampler` summary.
        error: one line, for failed or skipped rows.
    """

    backend: str
    precision: str
    batch: int = 1
    status: str = "ok"
    name: str = ""
    stats: LatencyStats | None = None
    stages: dict[str, LatencyStats] = field(default_factory=dict)
    samples_ms: list[float] | None = None
    size_mb: float | None = None
    parity: dict[str, Any] | None = None
    metric: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    power: dict[str, Any] | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise UserError(f"row status must be one of {', '.join(STATUSES)}, got '{self.status}'")
        if self.status == "ok" and self.stats is None:
            raise UserError(f"row '{self.backend} {self.precision}' is ok but has no stats")
        if not self.name:
            self.name = f"{self.backend} {self.precision} b{self.batch}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "precision": self.precision,
            "batch": self.batch,
            "status": self.status,
            "error": self.error,
            "size_mb": self.size_mb,
            "stats": self.stats.to_dict() if self.stats else None,
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
            "parity": self.parity,
            "metric": self.metric,
            "memory": self.memory,
            "power": self.power,
            # Microsecond resolution is all a perf_counter sample carries in practice.
            "samples_ms": None
            if self.samples_ms is None
            else [round(v, 4) for v in self.samples_ms],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchRow:
        return cls(
            backend=d["backend"],
            precision=d["precision"],
            batch=int(d["batch"]),
            status=d["status"],
            name=d.get("name") or "",
            stats=LatencyStats.from_dict(d["stats"]) if d.get("stats") else None,
            stages={k: LatencyStats.from_dict(v) for k, v in (d.get("stages") or {}).items()},
            samples_ms=d.get("samples_ms"),
            size_mb=d.get("size_mb"),
            parity=d.get("parity"),
            metric=d.get("metric"),
            memory=d.get("memory"),
            power=d.get("power"),
            error=d.get("error"),
        )


@dataclass
class BenchResult:
    """A whole benchmark run: where, with what settings, every row, ratios and estimates."""

    device: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)
    roofline: dict[str, Any] | None = None
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def add(self, row: BenchRow) -> BenchRow:
        """Append a row; its name must be unique in this result."""
        if any(r.name == row.name for r in self.rows):
            raise UserError(f"duplicate benchmark row name '{row.name}'")
        self.rows.append(row)
        return row

    def row(self, name: str) -> BenchRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise UserError(f"no benchmark row named '{name}' (have: {', '.join(self.names())})")

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def add_ratios(self, baseline: str, n_boot: int = 1000, seed: int = 0) -> list[Ratio]:
        """Speed-up of every other ``ok`` row over row ``baseline``: ratio of median ms/img.

        Latencies are divided by each row's batch first, so that rows of different batch
        sizes compare per image (for equal batches this is the ratio of median latencies).

        Rows with raw samples get a bootstrap 95% interval; rows without get the point
        ratio only. Replaces previously computed ratios.
        """
        base = self.row(baseline)
        if base.status != "ok" or base.stats is None:
            raise UserError(f"baseline row '{baseline}' has status '{base.status}', not ok")
        self.ratios = []
        for r in self.rows:
            if r is base or r.status != "ok" or r.stats is None:
                continue
            if base.samples_ms and r.samples_ms:
                ratio = speedup(
                    np.asarray(base.samples_ms) / base.batch,
                    np.asarray(r.samples_ms) / r.batch,
                    baseline=base.name,
                    candidate=r.name,
                    n_boot=n_boot,
                    seed=seed,
                )
            else:
                ratio = Ratio(
                    base.name, r.name, base.stats.ms_per_image / r.stats.ms_per_image, None, None
                )
            self.ratios.append(ratio)
        return self.ratios

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "format": RESULT_FORMAT,
            "created": self.created,
            "device": self.device,
            "config": self.config,
            "rows": [r.to_dict() for r in self.rows],
            "ratios": [r.to_dict() for r in self.ratios],
            "roofline": self.roofline,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<result>") -> BenchResult:
        """Rebuild a result; raises :class:`DataError` naming ``source`` and the bad field."""
        if d.get("schema") != RESULT_SCHEMA or d.get("format") != RESULT_FORMAT:
            raise DataError(
                f"{source}: not a fundus-edge benchmark result of format {RESULT_FORMAT} "
                f"(schema={d.get('schema')!r}, format={d.get('format')!r})"
            )
        rows = []
        for i, rd in enumerate(d.get("rows") or []):
            try:
                rows.append(BenchRow.from_dict(rd))
            except (KeyError, TypeError, ValueError, UserError) as exc:
                raise DataError(f"{source}: rows[{i}] is invalid ({exc!r})") from exc
        try:
            ratios = [Ratio(**r) for r in d.get("ratios") or []]
        except TypeError as exc:
            raise DataError(f"{source}: ratios are invalid ({exc})") from exc
        return cls(
            device=d.get("device") or {},
            rows=rows,
            config=d.get("config") or {},
            ratios=ratios,
            roofline=d.get("roofline"),
            created=d.get("created", ""),
        )


def read_result(path: str | os.PathLike) -> BenchResult:
    """Load a ``result.json`` written by :func:`write_report`."""
    import json

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"benchmark result not found: {p}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: line {exc.lineno} column {exc.colno}: invalid JSON") from exc
    return BenchResult.from_dict(data, source=str(p))


# ---------------------------------------------------------------------------- Markdown


def _f(v: float | None, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "nan"
    return f"{v:.{nd}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A GitHub Markdown table; ``align`` has one of ``l``/``r`` per column."""
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _device_line(dev: Mapping[str, Any]) -> str:
    parts = []
    jet = dev.get("jetson")
    if jet:
        parts.append(f"{jet.get('module')} (L4T {jet.get('l4t')}, JetPack {jet.get('jetpack')})")
        parts.append(
            f"power mode: {jet.get('power_mode')}, clocks locked: {jet.get('clocks_locked')}"
        )
    cpu = dev.get("cpu") or {}
    if cpu.get("model"):
        parts.append(f"CPU: {cpu['model']} ({cpu.get('cores')} cores)")
    for g in dev.get("gpus") or []:
        parts.append(f"GPU: {g.get('name')} (driver {g.get('driver')})")
    pk = dev.get("packages") or {}
    if pk:
        parts.append(", ".join(f"{k} {v}" for k, v in pk.items()))
    return "; ".join(parts) or "unknown device"


def render_markdown(result: BenchResult, title: str = "fundus-edge benchmark") -> str:
    """All tables of a result as one Markdown document."""
    out = [f"# {title}", "", f"{result.created} - {_device_line(result.device)}", ""]

    metric_name = next((r.metric["name"] for r in result.rows if r.metric), "metric")
    summary = []
    for r in result.rows:
        st = r.stats
        status = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[r.status]
        if r.parity is not None and r.parity.get("ok") is False:
            status += " (parity!)"
        summary.append(
            [
                r.backend,
                r.precision,
                str(r.batch),
                status,
                _f(r.size_mb, 1),
                _f(r.metric.get("value") if r.metric else None, 4),
                _f(st.ms_per_image if st else None),
                _f(st.throughput if st else None, 1),
            ]
        )
    out += [
        "## Summary",
        "",
        _table(
            ["Format", "Precision", "Batch", "Status", "Size (MB)", metric_name, "ms/img", "FPS"],
            summary,
            "llrlrrrr",
        ),
        "",
        "ms/img = median latency / batch; FPS = images per second.",
        "",
    ]

    ok = [r for r in result.rows if r.stats is not None]
    if ok:
        lat = [
            [r.name, str(r.stats.count)]
            + [
                _f(getattr(r.stats, k), 3)
                for k in ("min", "mean", "median", "p90", "p95", "p99", "max", "std")
            ]
            + [_f(r.stats.throughput, 1)]
            for r in ok
            if r.stats is not None
        ]
        head = ["Row", "n", "min", "mean", "median", "p90", "p95", "p99", "max", "std", "img/s"]
        out += ["## Latency (ms per call)", "", _table(head, lat, "l" + "r" * 10), ""]

    for r in result.rows:
        if r.stages:
            rows = [
                [k, _f(v.median, 3), _f(v.mean, 3), _f(v.p90, 3), _f(v.p99, 3), str(v.count)]
                for k, v in r.stages.items()
            ]
            out += [
                f"### Stages: {r.name}",
                "",
                _table(["Stage", "median", "mean", "p90", "p99", "n"], rows, "lrrrrr"),
                "",
            ]

    failed = [r for r in result.rows if r.status != "ok" and r.error]
    if failed:
        out += ["## Failed or skipped", ""] + [f"- {r.name}: {r.error}" for r in failed] + [""]

    if result.ratios:
        rows = [
            [
                q.candidate,
                q.baseline,
                f"{q.speedup:.2f}x",
                "-" if q.ci_low is None else f"{q.ci_low:.2f}-{q.ci_high:.2f}",
            ]
            for q in result.ratios
        ]
        out += [
            "## Speed-up (ratio of median ms/img)",
            "",
            _table(["Row", "vs", "speed-up", "95% CI (bootstrap)"], rows, "llrr"),
            "",
        ]

    rf = result.roofline
    if rf:
        rows = [
            [
                e["device_name"],
                e["precision"],
                str(e["batch"]),
                _f(e["peak_tops"], 2),
                _f(e["bandwidth_gbs"], 1),
                _f(e["latency_ms"], 3),
                _f(e["throughput"], 0),
            ]
            for e in rf.get("estimates", [])
        ]
        uncounted = rf.get("uncounted_ops") or {}
        out += [
            "## Jetson projection (roofline estimate, not a measurement)",
            "",
            f"{rf.get('macs', 0) / 1e9:.3f} GMACs = {rf.get('flops', 0) / 1e9:.3f} GFLOPs per call "
            f"(batch {rf.get('batch')}). Peaks: datasheet sparse INT8 TOPS / 2 = dense INT8; "
            "dense INT8 / 2 = dense FP16. " + str(rf.get("note", "")),
            "",
            _table(
                ["Device", "Precision", "Batch", "peak TOPS", "GB/s", "est. ms", "est. img/s"],
                rows,
                "llrrrrr",
            ),
            "",
        ]
        if uncounted:
            out += [
                "Ops with no FLOP count (bytes only): "
                + ", ".join(f"{k} x{v}" for k, v in sorted(uncounted.items())),
                "",
            ]
    return "\n".join(out)


# ---------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without touching pyplot's global state."""
    require("matplotlib", purpose="benchmark plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_latency(result: BenchResult, path: str | os.PathLike) -> Path:
    """Bars of median ms/img by backend (x) and precision (colour), whiskers up to p90."""
    rows = [r for r in result.rows if r.stats is not None]
    if not rows:
        raise UserError("no successful rows to plot")
    backends = list(dict.fromkeys(r.backend for r in rows))
    precisions = list(dict.fromkeys(r.precision for r in rows))
    batches = sorted({r.batch for r in rows})
    # Only (backend, batch) pairs that were measured get a slot on the x axis.
    groups = [
        (b, n)
        for b in backends
        for n in batches
        if any(r.backend == b and r.batch == n for r in rows)
    ]
    fig = _figure(max(5.0, 1.9 * len(groups)), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(precisions)
    for j, prec in enumerate(precisions):
        xs, meds, ups = [], [], []
        for i, (b, n) in enumerate(groups):
            hit = [r for r in rows if r.backend == b and r.batch == n and r.precision == prec]
            if hit and hit[0].stats is not None:
                st = hit[0].stats
                xs.append(i - 0.4 + width * (j + 0.5))
                meds.append(st.median / st.batch)
                ups.append((st.p90 - st.median) / st.batch)
        ax.bar(xs, meds, width, yerr=[[0] * len(ups), ups], capsize=3, label=prec)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([b if len(batches) == 1 else f"{b}\nb{n}" for b, n in groups])
    ax.set_ylabel("median ms / image (whisker: p90)")
    ax.legend(title="precision")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, path)


def plot_distribution(result: BenchResult, path: str | os.PathLike) -> Path:
    """Box plots of each row's raw per-call latencies (rows without samples are left out)."""
    rows = [r for r in result.rows if r.samples_ms]
    if not rows:
        raise UserError("no rows with raw samples to plot")
    fig = _figure(max(5.0, 1.9 * len(rows)), 3.8)
    ax = fig.add_subplot()
    ax.set_title("box: quartiles, whiskers: p1-p99", fontsize="small")
    ax.boxplot(
        [r.samples_ms for r in rows],
        tick_labels=[r.name.replace(" ", "\n") for r in rows],
        whis=(1, 99),  # whiskers at p1/p99, the rest drawn as points
        showfliers=True,
        flierprops={"markersize": 2},
    )
    ax.set_ylabel("ms per call")
    lo = min(min(r.samples_ms) for r in rows)
    hi = max(max(r.samples_ms) for r in rows)
    if lo > 0 and hi > 20 * lo:
        ax.set_yscale("log")  # rows differing by orders of magnitude stay readable
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, path)


def write_report(
    result: BenchResult, out_dir: str | os.PathLike, plots: bool = True
) -> dict[str, Path]:
    """Write ``result.json``, ``report.md`` and (with ``plots``) ``latency.png`` and
    ``distribution.png`` into ``out_dir``; return their paths by kind."""
    out = Path(out_dir)
    paths = {"json": out / "result.json", "markdown": out / "report.md"}
    atomic_write_json(paths["json"], result.to_dict())
    atomic_write_text(paths["markdown"], render_markdown(result) + "\n")
    if plots and any(r.stats is not None for r in result.rows):
        paths["latency_png"] = plot_latency(result, out / "latency.png")
        if any(r.samples_ms for r in result.rows):
            paths["distribution_png"] = plot_distribution(result, out / "distribution.png")
    return paths
