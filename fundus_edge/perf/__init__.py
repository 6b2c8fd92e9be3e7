"""Benchmarking: timing loops, latency statistics, roofline estimates, device records, reports.

Nothing here imports torch; onnx (roofline) and matplotlib (plots) are imported where used.
"""

from __future__ import annotations

from fundus_edge.perf.device import (
    RssSampler,
    TegraSample,
    TegrastatsSampler,
    device_record,
    gpu_memory,
    memory_record,
    parse_tegrastats,
    peak_rss_mb,
    start_tegrastats,
)
from fundus_edge.perf.report import (
    BenchResult,
    BenchRow,
    plot_distribution,
    plot_latency,
    read_result,
    render_markdown,
    write_report,
)
from fundus_edge.perf.roofline import (
    JETSON_PEAKS,
    DevicePeak,
    GraphCost,
    LayerCost,
    RooflineEstimate,
    count_graph,
    estimate,
    peaks_from_dict,
    roofline,
)
from fundus_edge.perf.stats import LatencyStats, Ratio, speedup, stage_stats
from fundus_edge.perf.timer import Measurement, StageTimer, measure

__all__ = [
    "JETSON_PEAKS",
    "BenchResult",
    "BenchRow",
    "DevicePeak",
    "GraphCost",
    "LatencyStats",
    "LayerCost",
    "Measurement",
    "Ratio",
    "RooflineEstimate",
    "RssSampler",
    "StageTimer",
    "TegraSample",
    "TegrastatsSampler",
    "count_graph",
    "device_record",
    "estimate",
    "gpu_memory",
    "measure",
    "memory_record",
    "parse_tegrastats",
    "peak_rss_mb",
    "peaks_from_dict",
    "plot_distribution",
    "plot_latency",
    "read_result",
    "render_markdown",
    "roofline",
    "speedup",
    "stage_stats",
    "start_tegrastats",
    "write_report",
]
