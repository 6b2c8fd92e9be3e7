"""Latency statistics in the shape trtexec reports them, and speed-up ratios between runs.

Percentiles use numpy's ``"linear"`` method (Hyndman & Fan type 7, numpy's default):
the p-th percentile of sorted samples ``x[0..n-1]`` is the straight-line interpolation
at fractional index ``(n - 1) * p / 100``. For ``1, 2, ..., 10`` ms that gives
p90 = 9.1 ms and median = 5.5 ms. trtexec picks a sample (nearest rank) instead; with
hundreds of samples the two differ by less than one inter-sample gap, and the
interpolated value does not jump when one sample is added.

``std`` is the population standard deviation (divide by ``n``), as trtexec prints it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "PERCENTILE_METHOD",
    "LatencyStats",
    "Ratio",
    "speedup",
    "stage_stats",
]

PERCENTILE_METHOD = "linear"


def _as_samples(samples_ms: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(samples_ms, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("no latency samples: measure at least one iteration")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError("latency samples must be finite and >= 0 ms")
    return x


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies, all times in milliseconds.

    ``throughput`` is images per second: ``batch * count / total`` where ``total`` is the
    sum of the samples, or the wall-clock time of the whole run when one was given
    (that includes loop overhead and any gaps between iterations, like trtexec's
    end-to-end throughput).
    """

    count: int
    batch: int
    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    std: float
    total_ms: float
    throughput: float
    throughput_basis: str  # "samples" or "wall"

    @classmethod
    def from_samples(
        cls, samples_ms: Sequence[float] | np.ndarray, batch: int = 1, wall_s: float | None = None
    ) -> LatencyStats:
        """Summarise latencies of ``count`` iterations, each processing ``batch`` images.

        Args:
            samples_ms: one latency per iteration, in ms.
            batch: images per iteration (for throughput).
            wall_s: wall-clock seconds of the whole timed run; when given, throughput is
                ``batch * count / wall_s`` instead of using the sum of samples.

        Raises:
            ValueError: no samples, negative or non-finite samples, batch < 1, wall_s <= 0.
        """
        x = _as_samples(samples_ms)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99], method=PERCENTILE_METHOD)
        total_ms = float(x.sum())
        if wall_s is not None:
            if not wall_s > 0:
                raise ValueError(f"wall_s must be > 0, got {wall_s}")
            throughput, basis = batch * x.size / wall_s, "wall"
        else:
            throughput = batch * x.size / (total_ms / 1e3) if total_ms > 0 else math.inf
            basis = "samples"
        return cls(
            count=int(x.size),
            batch=int(batch),
            min=float(x.min()),
            mean=float(x.mean()),
            median=float(p50),
            p90=float(p90),
            p95=float(p95),
            p99=float(p99),
            max=float(x.max()),
            std=float(x.std(ddof=0)),
            total_ms=total_ms,
            throughput=float(throughput),
            throughput_basis=basis,
        )

    @property
    def ms_per_image(self) -> float:
        """Median latency divided by the batch size."""
        return self.median / self.batch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyStats:
        """Inverse of :meth:`to_dict`; raises ``KeyError`` naming a missing field."""
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


def stage_stats(stages: Mapping[str, Sequence[float]], batch: int = 1) -> dict[str, LatencyStats]:
    """Per-stage statistics (e.g. H2D/compute/D2H or decode/preprocess/infer/...), order kept."""
    return {name: LatencyStats.from_samples(s, batch=batch) for name, s in stages.items()}


@dataclass(frozen=True)
class Ratio:
    """Speed-up of ``candidate`` over ``baseline``: ratio of median latencies.

    ``speedup > 1`` means the candidate is faster. ``ci_low``/``ci_high`` bound a 95%
    percentile-bootstrap interval of that ratio (None when not computed).
    """

    baseline: str
    candidate: str
    speedup: float
    ci_low: float | None
    ci_high: float | None
    statistic: str = "median"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def speedup(
    baseline_ms: Sequence[float] | np.ndarray,
    candidate_ms: Sequence[float] | np.ndarray,
    *,
    baseline: str = "baseline",
    candidate: str = "candidate",
    n_boot: int = 1000,
    seed: int = 0,
    max_boot_samples: int = 2000,
) -> Ratio:
    """Median(baseline) / median(candidate), with a bootstrap 95% interval.

    Each bootstrap round resamples both sample sets with replacement and recomputes
    the ratio of medians. Sample sets longer than ``max_boot_samples`` are thinned
    evenly (every k-th sample) for the bootstrap only, to bound its cost; the point
    estimate always uses every sample.

    Args:
        baseline_ms: latencies of the reference row, ms.
        candidate_ms: latencies of the row compared with it, ms.
        baseline: label for the baseline.
        candidate: label for the candidate.
        n_boot: bootstrap rounds; 0 skips the interval.
        seed: random seed, so that reports are reproducible.
        max_boot_samples: cap on samples per side fed to the bootstrap.
    """
    b, c = _as_samples(baseline_ms), _as_samples(candidate_ms)
    mc = float(np.median(c))
    if mc <= 0:
        raise ValueError(f"candidate '{candidate}' has a zero median latency")
    point = float(np.median(b)) / mc
    if n_boot <= 0:
        return Ratio(baseline, candidate, point, None, None)
    rng = np.random.default_rng(seed)

    def boot_medians(x: np.ndarray) -> np.ndarray:
        if x.size > max_boot_samples:
            x = x[:: math.ceil(x.size / max_boot_samples)]
        idx = rng.integers(0, x.size, size=(n_boot, x.size))
        return np.median(x[idx], axis=1)  # (n_boot,)

    mb, mcb = boot_medians(b), boot_medians(c)
    with np.errstate(divide="ignore"):
        ratios = mb / mcb
    lo, hi = np.percentile(ratios[np.isfinite(ratios)], [2.5, 97.5])
    return Ratio(baseline, candidate, point, float(lo), float(hi))
