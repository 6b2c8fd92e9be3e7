"""The edge install, measured: ``python bench/edge_install.py [--out DIR] [--keep DIR]``.

Builds the wheel from this checkout, installs it **without extras** into a fresh virtual
environment outside the repository (what ``pip install fundus-edge`` gives a device), and
records:

* the environment's size on disk, and the largest packages in it;
* import times (median of several fresh processes): ``fundus-edge --version`` (the CLI),
  and the runtime a device application loads (``fundus_edge.Predictor`` with the ONNX
  Runtime backend, i.e. numpy, OpenCV and ONNX Runtime);
* the packages installed, to show that no PyTorch, scikit-learn or matplotlib came with it.

Results go to ``bench/results/<device>/edge-install/`` (``result.json``, ``report.md``).
``tests/test_edge_install.py`` uses the same functions to run every device command in such
an environment. Needs network access to PyPI (the base dependencies are downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

__all__ = ["build_wheel", "install_edge", "main", "measure", "venv_bin"]


def _source_files(repo: Path) -> list[str]:
    """Files of the checkout (tracked, and new files git does not ignore)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo,
        capture_output=True,
        check=True,
    )
    return [f for f in out.stdout.decode().split("\0") if f]


def build_wheel(repo: Path, dest: Path) -> Path:
    """Build the wheel from a clean copy of ``repo`` (links kept: the profiles are one)."""
    src = dest / "src"
    for rel in _source_files(repo):
        a, b = repo / rel, src / rel
        if not a.exists() and not a.is_symlink():  # deleted in the work tree, not yet in git
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        if a.is_symlink():
            os.symlink(os.readlink(a), b)
        else:
            shutil.copy2(a, b)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(src)]
    try:
        import setuptools  # noqa: F401

        cmd.insert(5, "--no-build-isolation")  # the build backend is here: no download
    except ImportError:
        pass
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (wheel,) = dest.glob("fundus_edge-*.whl")
    return wheel


def venv_bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def install_edge(wheel: Path, venv: Path) -> Path:
    """A fresh venv with the wheel and its base dependencies only; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv_bin(venv, "python")
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"pip install {wheel.name} failed: {res.stderr.strip()[-2000:]}")
    return py


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _median_s(cmd: list[str], repeats: int, cwd: Path) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=cwd)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(venv: Path, repeats: int = 7) -> dict:
    """Size on disk, largest packages, import times and the installed packages of ``venv``."""
    py = venv_bin(venv, "python")
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    packages = {}
    for entry in site.iterdir():
        if entry.is_dir() and not entry.name.endswith((".dist-info", "__pycache__")):
            packages[entry.name] = _size(entry)
    listed = json.loads(
        subprocess.run(
            [str(py), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    runtime = (
        "from fundus_edge import Predictor; import fundus_edge.backends.onnxruntime, "
        "fundus_edge.runtime.pipeline, onnxruntime, cv2"
    )
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([str(py), "-c", runtime], check=True, cwd=cwd)  # warm the file cache
        times = {
            "python_startup_s": _median_s([str(py), "-c", "pass"], repeats, Path(cwd)),
            "cli_version_s": _median_s(
                [str(venv_bin(venv, "fundus-edge")), "--version"], repeats, Path(cwd)
            ),
            "runtime_import_s": _median_s([str(py), "-c", runtime], repeats, Path(cwd)),
        }
    top = sorted(packages.items(), key=lambda kv: -kv[1])[:10]
    return {
        "venv_mb": round(_size(venv) / 2**20, 1),
        "site_packages_mb": round(_size(site) / 2**20, 1),
        "largest_packages_mb": {k: round(v / 2**20, 1) for k, v in top},
        "import": {k: round(v, 3) for k, v in times.items()},
        "import_repeats": repeats,
        "runtime_import": runtime,
        "installed": {p["name"]: p["version"] for p in listed},
    }


def wheel_contents(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def _report(rec: dict) -> str:
    imp = rec["import"]
    lines = [
        "# The edge install (`pip install fundus-edge`, no extras)",
        "",
        f"Measured {rec['recorded']} on {rec['device']['cpu']}, Python {rec['python']}; "
        f"wheel {rec['wheel']}. `python bench/edge_install.py`.",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| virtual environment on disk | {rec['venv_mb']} MiB (site-packages {rec['site_packages_mb']} MiB) |",
        f"| `fundus-edge --version` (CLI start) | {imp['cli_version_s'] * 1e3:.0f} ms |",
        f"| runtime import (Predictor + ONNX Runtime backend + OpenCV) | {imp['runtime_import_s'] * 1e3:.0f} ms |",
        f"| bare `python -c pass` (for scale) | {imp['python_startup_s'] * 1e3:.0f} ms |",
        "",
        f"Medians of {rec['import_repeats']} fresh processes, file cache warm.",
        "",
        "Largest packages (MiB): "
        + ", ".join(f"{k} {v}" for k, v in rec["largest_packages_mb"].items()),
        "",
        "Installed: " + ", ".join(f"{k} {v}" for k, v in sorted(rec["installed"].items())),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Measure the edge install of fundus-edge.")
    ap.add_argument("--out", help="result folder [bench/results/<device>/edge-install]")
    ap.add_argument("--repeats", type=int, default=7, help="fresh processes per import timing")
    args = ap.parse_args(argv)
    from fundus_edge.perf.bench import device_slug
    from fundus_edge.perf.device import device_record

    device = device_record()
    with tempfile.TemporaryDirectory(prefix="fe-edge-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        wheel = build_wheel(REPO, tmp_path / "wheel")
        install_edge(wheel, tmp_path / "venv")
        install_s = time.perf_counter() - t0
        rec = measure(tmp_path / "venv", args.repeats)
        rec.update(
            wheel=wheel.name,
            wheel_kb=round(wheel.stat().st_size / 1024, 1),
            build_and_install_s=round(install_s, 1),
            python=".".join(map(str, sys.version_info[:3])),
            device={"cpu": device["cpu"]["model"], "cores": device["cpu"]["cores"]},
            recorded=device["recorded"],
        )
    out = (
        Path(args.out)
        if args.out
        else REPO / "bench" / "results" / device_slug(device) / "edge-install"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(rec, indent=2) + "\n")
    (out / "report.md").write_text(_report(rec))
    print(_report(rec))
    print(f"wrote {out / 'result.json'} and {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
