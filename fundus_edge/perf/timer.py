"""Timing loops with benchmark discipline: warm up, synchronise before reading the clock, repeat.

``measure`` times one callable again and again; ``StageTimer`` times the stages of a
pipeline (decode / preprocess / infer / postprocess / render, or H2D / compute / D2H)
inside one loop. Both read ``time.perf_counter_ns`` unless given another clock (tests
pass a fake one) and call an optional ``sync`` (e.g. ``torch.cuda.synchronize`` or a
CUDA stream's synchronize) before every clock read that ends a measurement, so that
asynchronous GPU work is counted where it happens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fundus_edge.errors import UserError
from fundus_edge.perf.stats import LatencyStats, stage_stats

__all__ = ["Measurement", "StageTimer", "measure"]

Clock = Callable[[], int]  # nanoseconds, monotonic

DEFAULT_WARMUP_ITERS = 10
DEFAULT_DURATION_S = 3.0


@dataclass
class Measurement:
    """Samples of a timed run.

    Attributes:
        samples_ms: one latency per timed iteration, ms.
        wall_s: wall-clock seconds from the first to the last timed clock read.
        warmup_iters: iterations run (untimed) before timing started.
    """

    samples_ms: list[float]
    wall_s: float
    warmup_iters: int

    def stats(self, batch: int = 1, wall_based: bool = False) -> LatencyStats:
        """Summary statistics; ``wall_based`` bases throughput on :attr:`wall_s`."""
        return LatencyStats.from_samples(
            self.samples_ms, batch=batch, wall_s=self.wall_s if wall_based else None
        )


def _check_choice(a: float | None, b: float | None, names: tuple[str, str]) -> None:
    if a is not None and b is not None:
        raise UserError(f"give either {names[0]} or {names[1]}, not both")
    for value, name in zip((a, b), names, strict=True):
        if value is not None and value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")


def measure(
    fn: Callable[[], object],
    *,
    warmup_iters: int | None = None,
    warmup_s: float | None = None,
    iters: int | None = None,
    duration_s: float | None = None,
    min_iters: int = 10,
    max_iters: int | None = None,
    sync: Callable[[], object] | None = None,
    clock: Clock = time.perf_counter_ns,
) -> Measurement:
    """Warm up, then time ``fn()`` for a number of iterations or a duration.

    Warm-up is ``warmup_iters`` calls or as many calls as fit in ``warmup_s``
    (default: 10 calls). Timing is ``iters`` calls, or calls until ``duration_s`` has
    passed *and* at least ``min_iters`` were timed (default: 3 s), stopping early at
    ``max_iters``. Each sample is ``clock()`` before the call to ``clock()`` after the
    call and ``sync()``.

    Args:
        fn: the work to time; its result is ignored.
        warmup_iters: untimed calls first.
        warmup_s: alternatively, seconds of untimed calls first.
        iters: exact number of timed calls.
        duration_s: alternatively, seconds of timed calls.
        min_iters: least number of timed calls in a duration-based run.
        max_iters: most timed calls in a duration-based run.
        sync: called after each call, before the clock is read (GPU synchronise).
        clock: monotonic nanosecond clock.

    Raises:
        UserError: both or negative values of a pair of options, or zero timed iterations.
    """
    _check_choice(warmup_iters, warmup_s, ("warmup_iters", "warmup_s"))
    _check_choice(iters, duration_s, ("iters", "duration_s"))
    if iters is not None and iters < 1:
        raise UserError(f"iters must be >= 1, got {iters}")
    if warmup_iters is None and warmup_s is None:
        warmup_iters = DEFAULT_WARMUP_ITERS
    if iters is None and duration_s is None:
        duration_s = DEFAULT_DURATION_S
    if max_iters is not None and max_iters < 1:
        raise UserError(f"max_iters must be >= 1, got {max_iters}")

    def call() -> None:
        fn()
        if sync is not None:
            sync()

    n_warm = 0
    if warmup_iters is not None:
        for _ in range(warmup_iters):
            call()
        n_warm = warmup_iters
    else:
        end = clock() + int(warmup_s * 1e9)  # type: ignore[operator]
        while clock() < end:
            call()
            n_warm += 1

    samples: list[float] = []
    start = clock()
    t0 = start
    deadline = None if duration_s is None else start + int(duration_s * 1e9)
    while True:
        if iters is not None:
            if len(samples) >= iters:
                break
        else:
            if max_iters is not None and len(samples) >= max_iters:
                break
            if len(samples) >= min_iters and t0 >= deadline:  # type: ignore[operator]
                break
        call()
        t1 = clock()
        samples.append((t1 - t0) / 1e6)
        # The end of one sample is the start of the next: no clock read goes untimed.
        t0 = t1
    return Measurement(samples_ms=samples, wall_s=(t0 - start) / 1e9, warmup_iters=n_warm)


@dataclass
class StageTimer:
    """Accumulate per-stage latencies of a pipeline loop.

    Example::

        timer = StageTimer(sync=torch.cuda.synchronize)
        for frame in frames:
            with timer.stage("preprocess"):
                x = preprocess(frame)
            with timer.stage("infer"):
                y = model(x)
        stats = timer.stats(batch=1)  # {"preprocess": LatencyStats, "infer": ...}
    """

    sync: Callable[[], object] | None = None
    clock: Clock = time.perf_counter_ns
    samples_ms: dict[str, list[float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block as one sample of stage ``name``."""
        t0 = self.clock()
        yield
        if self.sync is not None:
            self.sync()
        self.samples_ms.setdefault(name, []).append((self.clock() - t0) / 1e6)

    def add(self, name: str, ms: float) -> None:
        """Record a duration measured elsewhere (e.g. CUDA events, ORT profiling)."""
        self.samples_ms.setdefault(name, []).append(float(ms))

    def stats(self, batch: int = 1) -> dict[str, LatencyStats]:
        """Per-stage :class:`LatencyStats`, in the order stages were first seen."""
        return stage_stats(self.samples_ms, batch=batch)
