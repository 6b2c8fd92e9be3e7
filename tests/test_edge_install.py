"""The device stands alone: the wheel installed without extras runs every device command.

The wheel is built from this checkout and installed into a fresh virtual environment outside
the repository (``bench/edge_install.py``, which also measures its size). From a temporary
folder, on a ``model.onnx`` this test exports with PyTorch, the edge install then exports
(FP16, INT8, Triton, a shipped profile; an engine is exit 2 without TensorRT), evaluates,
benchmarks and runs the model. An import hook in that environment records every attempt to
import PyTorch or another workstation package: there must be none (checked, not assumed).
Needs network access to PyPI for the base dependencies (as ``make test`` itself does).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the model is exported with torch (the train extra)")
edge_install = pytest.importorskip("edge_install", reason="bench/edge_install.py is missing")

pytestmark = pytest.mark.slow

# Workstation packages: importing any of them on the device is a bug.
WORKSTATION = (
    "torch",
    "torchvision",
    "pytorch_grad_cam",
    "sklearn",
    "matplotlib",
    "onnxslim",
    "safetensors",
)

HOOK = '''
import os, sys
_WATCH = set(os.environ["FE_WATCH"].split(","))
_LOG = os.environ["FE_IMPORT_LOG"]


class _Watch:
    """Records every attempt to import a workstation package, then lets the import go on."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _WATCH:
            with open(_LOG, "a") as f:
                f.write(f"{name} (in {' '.join(sys.argv)})\\n")
        return None


sys.meta_path.insert(0, _Watch())
'''


@pytest.fixture(scope="module")
def edge(tmp_path_factory, repo_root):
    """(venv, environment for its commands, import log)."""
    tmp = tmp_path_factory.mktemp("edge")
    wheel = edge_install.build_wheel(repo_root, tmp / "wheel")
    names = edge_install.wheel_contents(wheel)
    assert "fundus_edge/profiles/jetson-orin-nano-fp16.yaml" in names  # the wheel is complete
    assert "fundus_edge/profiles/x86-cpu-int8.yaml" in names
    assert not [n for n in names if n.split("/")[0] in ("bench", "training", "export", "tests")]
    assert not [n for n in names if "scenarios" in n or n.endswith("perf/suite.py")]
    venv = tmp / "venv"
    py = edge_install.install_edge(wheel, venv)
    installed = json.loads(
        subprocess.run(
            [str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True
        ).stdout
    )
    names = {p["name"].lower() for p in installed}
    assert not names & {"torch", "torchvision", "grad-cam", "scikit-learn", "matplotlib"}
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    log = tmp / "imports.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PYTHONPATH=str(hook),
        FE_WATCH=",".join(WORKSTATION),
        FE_IMPORT_LOG=str(log),
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return venv, env, log


@pytest.fixture(scope="module")
def device_dir(tmp_path_factory, tiny_synth):
    """A folder on "the device" holding the workstation's model.onnx (and nothing else)."""
    from test_export_from_onnx import _checkpoint

    from fundus_edge.convert.chain import export_model
    from fundus_edge.convert.export_config import ExportConfig

    ws = tmp_path_factory.mktemp("workstation")
    ckpt = _checkpoint(ws / "screening.safetensors", size=64)
    export_model(ExportConfig(model=str(ckpt), out=str(ws / "export"), verify_images=2))
    dev = tmp_path_factory.mktemp("device")
    (dev / "model.onnx").write_bytes((ws / "export" / "model.onnx").read_bytes())
    return dev


def fe(edge, cwd: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    venv, env, _ = edge
    exe = edge_install.venv_bin(venv, "fundus-edge")
    res = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    assert res.returncode == code, (args, res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    return res


def test_every_device_command_runs_without_pytorch(edge, device_dir, tiny_synth):
    data = str(tiny_synth)
    d = device_dir
    fe(edge, d, "export", "--model", "model.onnx", "--fp16")
    rep = json.loads((d / "exports/model/export_report.json").read_text())
    assert rep["passed"] and rep["checks"]["fp16_vs_fp32"]["passed"]
    assert (d / "exports/model/model.fp16.onnx").is_file()

    fe(edge, d, "export", "--model", "model.onnx", "--int8", "--calib", data,
       "--calib-count", "8", "--out", "int8")  # fmt: skip
    rep = json.loads((d / "int8/export_report.json").read_text())
    assert [s["step"] for s in rep["steps"]] == ["read_onnx", "onnx_to_int8"]
    assert (d / "int8/model.int8.onnx").is_file()

    fe(edge, d, "export", "--model", "model.onnx", "--format", "triton", "--out", "triton")
    assert (d / "triton/triton/model/config.pbtxt").is_file()
    assert (d / "triton/triton/model/1/model.onnx").is_file()

    res = fe(
        edge, d, "export", "--model", "model.onnx", "--format", "engine", "--out", "eng", code=2
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "TensorRT is not installed here" in lines[0]
    assert (d / "eng/model.onnx").is_file()

    # A profile shipped inside the wheel, found by name from a folder outside the repository.
    fe(edge, d, "export", "--model", "model.onnx", "--profile", "x86-cpu-int8", "--calib", data,
       "--calib-count", "4", "--out", "prof")  # fmt: skip
    assert json.loads((d / "prof/export_report.json").read_text())["config"]["profile"].endswith(
        "fundus_edge/profiles/x86-cpu-int8.yaml"
    )

    res = fe(edge, d, "eval", "--model", "int8/model.int8.onnx", "--data", data, "--json", "e.json")
    assert "macro AUROC" in res.stdout
    assert json.loads((d / "e.json").read_text())["n"] > 0

    fe(edge, d, "bench", "--model", "model.onnx", "--iters", "3", "--warmup-iters", "1",
       "--frames", "2", "--calib-count", "4", "--json", "b.json")  # fmt: skip
    rows = json.loads((d / "b.json").read_text())["rows"]
    ok = {(r["backend"], r["precision"]) for r in rows if r["status"] == "ok"}
    assert {("onnxruntime-cpu", p) for p in ("fp32", "fp16", "int8")} <= ok

    test_images = sorted((tiny_synth / "Test_Set" / "Test").glob("*.png"))
    fe(edge, d, "run", "model.onnx", str(tiny_synth / "Test_Set" / "Test"), "--headless",
       "--jsonl", "r.jsonl")  # fmt: skip
    records = (d / "r.jsonl").read_text().splitlines()
    assert len(records) == len(test_images) and "probabilities" in json.loads(records[0])

    # What the edge install cannot do says so: exit 3 naming the extra, before any work.
    res = fe(edge, d, "eval", "--model", "model.onnx", "--data", data, "--out", "plots", code=3)
    assert "pip install 'fundus-edge[plots]'" in res.stderr and not (d / "plots").exists()

    log = edge[2]
    attempts = log.read_text() if log.exists() else ""
    # The one expected attempt: the plots extra probed by `eval --out`.
    unexpected = [ln for ln in attempts.splitlines() if not ln.startswith("matplotlib")]
    assert unexpected == [], "workstation packages imported on the device:\n" + "\n".join(
        unexpected
    )


def test_doctor_on_the_edge_install(edge, tmp_path):
    res = fe(edge, tmp_path, "doctor", "--json", "--no-camera-probe")
    report = json.loads(res.stdout)
    assert report["backends"]["torch"]["available"] is False
    assert report["backends"]["onnxruntime"]["available"] is True
    assert "advice" in report["cuda"]
