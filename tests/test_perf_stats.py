"""Latency statistics, speed-up ratios and timing loops, on synthetic timings and a fake clock."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fundus_edge.errors import UserError
from fundus_edge.perf.stats import LatencyStats, Ratio, speedup, stage_stats
from fundus_edge.perf.timer import StageTimer, measure

# ---------------------------------------------------------------------------- LatencyStats


def test_hand_case_one_to_ten():
    st = LatencyStats.from_samples([float(v) for v in range(10, 0, -1)])  # order must not matter
    assert st.count == 10 and st.batch == 1
    assert st.min == 1.0 and st.max == 10.0
    assert st.mean == pytest.approx(5.5)
    # numpy "linear": index (n - 1) * p = 9 * p into the sorted samples 1..10.
    assert st.median == pytest.approx(5.5)
    assert st.p90 == pytest.approx(9.1)
    assert st.p95 == pytest.approx(9.55)
    assert st.p99 == pytest.approx(9.91)
    assert st.std == pytest.approx(math.sqrt(8.25))  # population std of 1..10
    assert st.total_ms == pytest.approx(55.0)
    assert st.throughput == pytest.approx(10 / 0.055)
    assert st.throughput_basis == "samples"
    assert st.ms_per_image == pytest.approx(5.5)


def test_batch_and_wall_throughput():
    st = LatencyStats.from_samples([2.0, 2.0, 2.0, 2.0], batch=8)
    assert st.throughput == pytest.approx(8 * 4 / 0.008)
    assert st.ms_per_image == pytest.approx(0.25)
    wall = LatencyStats.from_samples([2.0, 2.0, 2.0, 2.0], batch=8, wall_s=0.016)
    assert wall.throughput == pytest.approx(8 * 4 / 0.016)
    assert wall.throughput_basis == "wall"
    assert wall.median == st.median  # wall time changes throughput only


def test_single_sample():
    st = LatencyStats.from_samples([3.25])
    assert st.min == st.median == st.p99 == st.max == 3.25
    assert st.std == 0.0


@pytest.mark.parametrize(
    ("samples", "kwargs"),
    [
        ([], {}),
        ([1.0, -0.5], {}),
        ([1.0, float("nan")], {}),
        ([1.0, float("inf")], {}),
        ([1.0], {"batch": 0}),
        ([1.0], {"wall_s": 0.0}),
    ],
)
def test_rejects_bad_input(samples, kwargs):
    with pytest.raises(ValueError):
        LatencyStats.from_samples(samples, **kwargs)


def test_known_distribution():
    # 1 ms floor + exponential tail of mean 2 ms: quantile(q) = 1 - 2 ln(1 - q).
    rng = np.random.default_rng(1)
    x = 1.0 + rng.exponential(2.0, size=200_000)
    st = LatencyStats.from_samples(x)
    for q, got in ((0.5, st.median), (0.9, st.p90), (0.95, st.p95), (0.99, st.p99)):
        assert got == pytest.approx(1 - 2 * math.log(1 - q), rel=0.02)
    assert st.mean == pytest.approx(3.0, rel=0.01)
    assert st.std == pytest.approx(2.0, rel=0.02)
    assert st.min >= 1.0


def test_dict_round_trip():
    st = LatencyStats.from_samples([1.0, 2.0, 4.0], batch=2)
    assert LatencyStats.from_dict(st.to_dict()) == st
    with pytest.raises(KeyError):
        LatencyStats.from_dict({"count": 1})


def test_stage_stats_keeps_order():
    out = stage_stats({"decode": [1.0, 3.0], "infer": [10.0], "render": [0.5]}, batch=2)
    assert list(out) == ["decode", "infer", "render"]
    assert out["decode"].median == 2.0 and out["infer"].batch == 2


# ---------------------------------------------------------------------------- ratios


def test_speedup_exact_on_constant_samples():
    r = speedup([8.0] * 50, [2.0] * 50, baseline="fp32", candidate="int8")
    assert isinstance(r, Ratio)
    assert r.speedup == 4.0
    assert r.ci_low == r.ci_high == 4.0
    assert (r.baseline, r.candidate, r.statistic) == ("fp32", "int8", "median")


def test_speedup_recovers_known_ratio_with_interval():
    rng = np.random.default_rng(0)
    base = rng.lognormal(np.log(10.0), 0.1, size=400)
    cand = rng.lognormal(np.log(5.0), 0.1, size=400)
    r = speedup(base, cand)
    assert r.speedup == pytest.approx(2.0, rel=0.03)
    assert r.ci_low < r.speedup < r.ci_high
    assert r.ci_low < 2.0 < r.ci_high
    assert r.ci_high - r.ci_low < 0.15  # 400 samples pin a median down well
    # reproducible with the same seed, and the point estimate ignores the bootstrap
    assert speedup(base, cand) == r
    assert speedup(base, cand, n_boot=0) == Ratio("baseline", "candidate", r.speedup, None, None)


def test_speedup_thins_long_runs_for_bootstrap_only():
    rng = np.random.default_rng(2)
    base, cand = rng.normal(20, 1, 50_000), rng.normal(10, 0.5, 50_000)
    t0 = time.perf_counter()
    r = speedup(base, cand, n_boot=200, max_boot_samples=1000)
    assert time.perf_counter() - t0 < 5
    assert r.speedup == pytest.approx(np.median(base) / np.median(cand))
    assert r.ci_low < 2.0 < r.ci_high


# ---------------------------------------------------------------------------- measure


class FakeClock:
    """A nanosecond clock that moves only when the timed function says so."""

    def __init__(self) -> None:
        self.now = 1_000_000
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * 1e6)


def test_measure_exact_iterations_with_fake_clock():
    clock = FakeClock()
    durations = iter([100.0] * 3 + [1.0, 2.0, 3.0, 4.0, 5.0])  # 3 slow warm-up calls first
    events: list[str] = []

    def fn():
        events.append("fn")
        clock.advance_ms(next(durations))

    def sync():
        events.append("sync")
        clock.advance_ms(0.5)  # waiting for the device is part of the latency

    m = measure(fn, warmup_iters=3, iters=5, sync=sync, clock=clock)
    assert m.warmup_iters == 3
    assert m.samples_ms == pytest.approx([1.5, 2.5, 3.5, 4.5, 5.5])
    assert m.wall_s == pytest.approx(17.5e-3)
    assert events == ["fn", "sync"] * 8  # sync after every call, warm-up included
    assert m.stats(batch=2).median == pytest.approx(3.5)
    assert m.stats(batch=2, wall_based=True).throughput == pytest.approx(2 * 5 / 17.5e-3)


def test_measure_duration_min_and_max_iters():
    clock = FakeClock()
    m = measure(lambda: clock.advance_ms(10), warmup_iters=0, duration_s=0.1, clock=clock)
    assert len(m.samples_ms) == 10 and set(m.samples_ms) == {10.0}
    m = measure(
        lambda: clock.advance_ms(10), warmup_iters=0, duration_s=0.1, min_iters=25, clock=clock
    )
    assert len(m.samples_ms) == 25  # a duration never cuts a run below min_iters
    m = measure(
        lambda: clock.advance_ms(10), warmup_iters=0, duration_s=10, max_iters=7, clock=clock
    )
    assert len(m.samples_ms) == 7


def test_measure_time_based_warmup():
    clock = FakeClock()
    m = measure(lambda: clock.advance_ms(20), warmup_s=0.1, iters=2, clock=clock)
    assert m.warmup_iters == 5
    assert m.samples_ms == [20.0, 20.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_iters": 1, "warmup_s": 1.0},
        {"iters": 3, "duration_s": 1.0},
        {"iters": 0},
        {"warmup_iters": -1},
        {"duration_s": -1.0},
        {"max_iters": 0},
    ],
)
def test_measure_rejects_bad_options(kwargs):
    with pytest.raises(UserError):
        measure(lambda: None, **kwargs)


def test_measure_real_clock():
    m = measure(lambda: time.sleep(0.002), warmup_iters=1, iters=5)
    assert len(m.samples_ms) == 5
    assert all(1.9 <= s < 200 for s in m.samples_ms)
    assert m.wall_s * 1e3 == pytest.approx(sum(m.samples_ms), rel=1e-6)


# ---------------------------------------------------------------------------- StageTimer


def test_stage_timer_fake_clock():
    clock = FakeClock()
    synced: list[int] = []
    timer = StageTimer(sync=lambda: synced.append(1), clock=clock)
    for i in range(3):
        with timer.stage("preprocess"):
            clock.advance_ms(2)
        with timer.stage("infer"):
            clock.advance_ms(10 + i)
    timer.add("render", 0.25)
    with pytest.raises(RuntimeError), timer.stage("postprocess"):
        raise RuntimeError("boom")
    assert timer.samples_ms == {
        "preprocess": [2.0, 2.0, 2.0],
        "infer": [10.0, 11.0, 12.0],
        "render": [0.25],
    }  # a failed stage leaves no sample
    assert len(synced) == 6
    st = timer.stats(batch=1)
    assert list(st) == ["preprocess", "infer", "render"]
    assert st["infer"].median == 11.0
