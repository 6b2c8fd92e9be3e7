"""Run the benchmark suite: ``python bench/run_suite.py [--quick] [--suite FILE] [--out DIR]``.

A thin entry point of a repository tool (not in the wheel); the suite lives in
``bench/suite.py`` beside this file and needs the ``train`` extra.
"""

from __future__ import annotations

from suite import main  # bench/suite.py: this script's folder is on sys.path

if __name__ == "__main__":
    raise SystemExit(main())
