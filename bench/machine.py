"""What the bench scripts record about the machine they measured on (shared by them)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "command",
    "cpu_model",
    "default_out",
    "device_info",
    "load_average",
    "versions",
    "write_result",
]


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The installed versions of ``packages`` (those not installed are left out)."""
    out = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (other processes' share of a shared machine)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def device_info(packages: tuple[str, ...]) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions(packages),
    }


def command(script: str, argv: list[str] | None) -> str:
    """The command line a result records: ``python bench/SCRIPT ARGS`` (as typed, quoted)."""
    shown = sys.argv[1:] if argv is None else argv
    return " ".join([f"python bench/{script}", *map(shlex.quote, shown)])


def default_out(name: str) -> Path:
    """``bench/results/<device>/<name>``: the device's folder (its slug, as the suite names it)."""
    from fundus_edge.perf.bench import device_slug
    from fundus_edge.perf.device import device_record

    return Path(__file__).resolve().parent / "results" / device_slug(device_record()) / name


def write_result(out: Path, rec: dict[str, Any], report: Callable[[dict[str, Any]], str]) -> None:
    """``result.json`` and its ``README.md`` (``report(rec)``) into ``out``, each written
    atomically; the README is printed, then where both went."""
    from fundus_edge.fileio import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "result.json", rec)
    text = report(rec)
    atomic_write_text(out / "README.md", text)
    print(text)
    print(f"wrote {out / 'result.json'} and {out / 'README.md'}")
