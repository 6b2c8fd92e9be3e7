"""The ``fundus-edge`` command line. Commands parse options and call one library function each.

Each ``cmd_*`` module registers its commands on :data:`app` and imports heavy
dependencies (torch, onnx, tensorrt) inside the command body only, so ``--help`` and
``doctor`` stay fast with only the base dependencies installed.
"""

from __future__ import annotations

from fundus_edge.cli.app import app, main

# Registration by import; keep this list sorted.
from fundus_edge.cli import cmd_bench  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_clip  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_data  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_distill  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_doctor  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_explain  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_export  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_report  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_run  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_synth  # noqa: F401  isort: skip
from fundus_edge.cli import cmd_train  # noqa: F401  isort: skip

__all__ = ["app", "main"]
