"""Run the benchmark suite: ``python bench/run_suite.py [--quick] [--suite FILE] [--out DIR]``.

A thin entry point; everything lives in :mod:`fundus_edge.perf.scenarios`.
"""

from __future__ import annotations

from fundus_edge.perf.scenarios import main

if __name__ == "__main__":
    raise SystemExit(main())
