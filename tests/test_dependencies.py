"""Exit 3 everywhere: every command, in environments each lacking one optional package.

Each case runs the real CLI in a subprocess whose ``sitecustomize`` makes one package
unimportable (as if it were not installed) and records every attempt to import it. The
command must stop with exit 3 and one line naming the package, the command that needed it
and the extra that brings it; never an internal error, never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the fixtures are made with torch (the train extra)")

BLOCKER = '''
import os, sys
_BLOCK = set(filter(None, os.environ.get("FE_BLOCK", "").split(",")))
_LOG = os.environ.get("FE_IMPORT_LOG")


class _Blocked:
    """Finds the blocked packages first and says they are not there (as pip would have)."""

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in _BLOCK:
            if _LOG:
                with open(_LOG, "a") as f:
                    f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return None


sys.meta_path.insert(0, _Blocked())
'''

# (module blocked, extra named in the message): the extra comes from errors.OPTIONAL_MODULES.
EXTRA = {
    "torch": "fundus-edge[train]",
    "torchvision": "fundus-edge[train]",
    "safetensors": "fundus-edge[train]",
    "pytorch_grad_cam": "fundus-edge[train]",
    "matplotlib": "fundus-edge[plots]",
    "onnxruntime": "fundus-edge[cpu-wheels]",
    "cv2": "fundus-edge[cpu-wheels]",
    "onnx": "pip install 'onnx'",
    "openvino": "fundus-edge[openvino]",
    "pydicom": "fundus-edge[dicom]",
    "pynetdicom": "fundus-edge[dicom]",
    "reportlab": "fundus-edge[report]",
    "uvicorn": "fundus-edge[serve]",
}

# Every command x the optional packages it needs. {ckpt}, {onnx}, {data}, {out} are filled in.
CASES = [
    (
        "train",
        "torch",
        ["--config", "training/demo-cpu.yaml", "--data", "{data}", "--out", "{out}"],
    ),
    (
        "train",
        "torchvision",
        ["--config", "training/demo-cpu.yaml", "--data", "{data}", "--out", "{out}"],
    ),
    (
        "train",
        "safetensors",
        ["--config", "training/demo-cpu.yaml", "--data", "{data}", "--out", "{out}"],
    ),
    (
        "train",
        "matplotlib",
        ["--config", "training/demo-cpu.yaml", "--data", "{data}", "--out", "{out}"],
    ),
    ("eval", "torch", ["--model", "{ckpt}", "--data", "{data}"]),
    ("eval", "safetensors", ["--model", "{ckpt}", "--data", "{data}"]),
    ("eval", "matplotlib", ["--model", "{onnx}", "--data", "{data}", "--out", "{out}"]),
    ("eval", "onnxruntime", ["--model", "{onnx}", "--data", "{data}"]),
    ("eval", "cv2", ["--model", "{onnx}", "--data", "{data}"]),
    ("export", "torch", ["--model", "{ckpt}", "--out", "{out}"]),
    ("export", "torchvision", ["--model", "{ckpt}", "--out", "{out}"]),
    ("export", "safetensors", ["--model", "{ckpt}", "--out", "{out}"]),
    ("export", "pytorch_grad_cam", ["--model", "{ckpt}", "--out", "{out}"]),
    ("export", "onnx", ["--model", "{onnx}", "--out", "{out}", "--fp16"]),
    (
        "export",
        "onnxruntime",
        ["--model", "{onnx}", "--out", "{out}", "--int8", "--calib", "{data}"],
    ),
    ("export", "cv2", ["--model", "{onnx}", "--out", "{out}", "--int8", "--calib", "{data}"]),
    ("run", "openvino", ["{onnx}", "{data}/Test_Set/Test", "--headless", "--backend", "openvino"]),
    ("eval", "openvino", ["--model", "{onnx}", "--data", "{data}", "--backend", "openvino"]),
    ("export", "openvino", ["--model", "{onnx}", "--out", "{out}", "--format", "openvino"]),
    ("run", "torch", ["{ckpt}", "{data}/Test_Set/Test", "--headless"]),
    ("run", "safetensors", ["{ckpt}", "{data}/Test_Set/Test", "--headless"]),
    ("run", "onnxruntime", ["{onnx}", "{data}/Test_Set/Test", "--headless"]),
    ("run", "cv2", ["{onnx}", "{data}/Test_Set/Test", "--headless"]),
    ("bench", "torch", ["--model", "{ckpt}", "--iters", "1"]),
    ("bench", "onnxruntime", ["--model", "{onnx}", "--iters", "1"]),
    ("bench", "matplotlib", ["--model", "{onnx}", "--iters", "1", "--out", "{out}"]),
    ("bench", "cv2", ["--model", "{onnx}", "--iters", "1"]),
    ("synth", "cv2", ["{out}", "--n", "4", "--size", "64"]),
    ("prepare", "cv2", ["{data}", "{out}", "--size", "64"]),
    ("clip", "cv2", ["{data}/Test_Set/Test", "--out", "{out}/c.mp4"]),
    ("run", "pydicom", ["{onnx}", "{dicom}", "--headless"]),
    ("report", "pydicom", ["{onnx}", "{dicom}", "--out", "{out}"]),
    ("report", "reportlab", ["{onnx}", "{data}/Test_Set/Test", "--out", "{out}"]),
    ("run", "reportlab", ["{onnx}", "{data}/Test_Set/Test", "--headless", "--report", "{out}"]),
    ("run", "uvicorn", ["{onnx}", "{data}/Test_Set/Test", "--headless", "--serve", "0"]),
    ("report", "pynetdicom", ["{onnx}", "{dicom}", "--out", "{out}", "--send", "A@127.0.0.1:9"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_synth) -> dict[str, str]:
    import torch

    from fundus_edge.convert.steps import Artifact, CheckpointToOnnx, StepContext
    from fundus_edge.models import EnsembleConfig, build_ensemble, save_checkpoint
    from fundus_edge.preprocess import PreprocessConfig

    tmp = tmp_path_factory.mktemp("deps")
    torch.manual_seed(0)
    cfg = EnsembleConfig(members=("resnet18",), num_classes=3, member_head="gap", image_size=32)
    ckpt = save_checkpoint(
        tmp / "m.safetensors",
        build_ensemble(cfg).eval(),
        extra={"preprocess": PreprocessConfig(size=32).to_dict()},
    )
    ctx = StepContext(out=tmp, verify=False)
    onnx = CheckpointToOnnx("m", simplify=False).run(Artifact("checkpoint", ckpt), ctx).artifact
    from fundus_edge.data.readers.dicom import write_photo
    from fundus_edge.preprocess import read_image

    first = sorted(Path(tiny_synth, "Test_Set", "Test").glob("*.png"))[0]
    write_photo(tmp / "dicom" / "p1" / "right.dcm", read_image(first), syntax="jpeg", eye="R")
    blocker = tmp / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return {
        "ckpt": str(ckpt),
        "onnx": str(onnx.path),
        "data": str(tiny_synth),
        "dicom": str(tmp / "dicom"),
        "blocker": str(blocker),
    }


def run_blocked(cli_exe, args, block: str, blocker: str, cwd: Path, log: Path):
    env = dict(os.environ, FE_BLOCK=block, FE_IMPORT_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [blocker, env.get("PYTHONPATH")]))
    return subprocess.run(
        [*cli_exe, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


@pytest.mark.parametrize(
    ("command", "module", "args"), CASES, ids=[f"{c}-without-{m}" for c, m, _ in CASES]
)
def test_a_missing_package_is_exit_3_naming_it(
    models, cli_exe, repo_root, tmp_path, command, module, args
):
    fill = {**models, "out": str(tmp_path / "out")}
    argv = [command, *(a.format(**fill) for a in args)]
    log = tmp_path / "imports.log"
    res = run_blocked(cli_exe, argv, module, models["blocker"], repo_root, log)
    assert log.is_file(), f"{argv} never tried to import {module}: the case is wrong"
    assert res.returncode == 3, (argv, res.returncode, res.stdout[-800:], res.stderr[-1500:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr  # one line, no traceback
    line = lines[0]
    assert line.startswith(f"fundus-edge: error: fundus-edge {command} needs '{module}'"), line
    assert EXTRA[module] in line, line
    assert "internal error" not in line


def test_the_blocker_is_real(models, cli_exe, repo_root, tmp_path):
    """Control: with nothing blocked the same kind of call succeeds (the failures above are
    the blocked package's, not the fixture's)."""
    log = tmp_path / "imports.log"
    res = run_blocked(cli_exe, ["dataset", models["data"]], "", models["blocker"], repo_root, log)
    assert res.returncode == 0, res.stderr
    assert not log.exists()


def test_require_names_the_module_the_command_and_the_extra(monkeypatch):
    from fundus_edge import errors

    errors.set_command("export")
    try:
        with pytest.raises(errors.MissingDependencyError) as exc:
            errors.require("fundus_edge_no_such_module", extra="train", purpose="a test")
        msg = str(exc.value)
        assert msg.startswith("fundus-edge export needs 'fundus_edge_no_such_module' for a test")
        assert "pip install 'fundus-edge[train]'" in msg
        # A module the table knows: its extra, whatever the caller says.
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: ImportError
        with pytest.raises(errors.MissingDependencyError, match=r"fundus-edge\[plots\]"):
            errors.require("matplotlib", purpose="plots")
    finally:
        errors.set_command(None)


def test_jetson_hints_never_say_pip_for_jetpack_packages(monkeypatch):
    import platform

    from fundus_edge import errors

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert "JetPack" in errors.missing_dependency_message("tensorrt")
    assert "onnxruntime-gpu" in errors.missing_dependency_message("onnxruntime")
    assert "python3-opencv" in errors.missing_dependency_message("cv2")
    assert "--no-deps grad-cam" in errors.missing_dependency_message("pytorch_grad_cam")
    assert "fundus-edge[train]" in errors.missing_dependency_message("torch")


def test_an_unrouted_import_error_still_exits_3(monkeypatch):
    """The CLI's last line of defence: an optional import that bypassed `require`."""
    from typer.testing import CliRunner

    import fundus_edge.cli.cmd_doctor as cmd_doctor
    from fundus_edge.cli import app

    def broken(**_kw):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr("fundus_edge.doctor.collect", broken)
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 3, res.output
    assert "fundus-edge doctor needs 'matplotlib'" in res.output
    assert cmd_doctor  # registered


SHADOWING = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "onnxruntime"}


def _closure(reqs: list[str], machine: str) -> tuple[set[str], set[str]]:
    """Distributions a requirement list pulls on ``machine``, walking installed metadata.

    Returns (pulled, not_walked): distributions whose own requirements are not installed here
    cannot be walked further and are listed in the second set.
    """
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {**default_environment(), "platform_machine": machine}
    pulled: set[str] = set()
    unknown: set[str] = set()
    todo = [(Requirement(r), "") for r in reqs]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for want in req.extras or {""}:
            key = f"{name}[{want}]"
            if key in pulled:
                continue
            pulled.add(key)
            try:
                deps = metadata.requires(req.name) or []
            except metadata.PackageNotFoundError:
                unknown.add(name)
                continue
            todo += [(Requirement(d), want) for d in deps]
    return {p.split("[")[0] for p in pulled}, unknown


def test_no_extra_pulls_pypi_opencv_or_onnxruntime_on_aarch64(repo_root):
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    assert set(groups) >= {"base", "plots", "train", "trt", "dev", "cpu-wheels"}
    for name, reqs in groups.items():
        pulled, _ = _closure(reqs, "aarch64")
        if name == "cpu-wheels":  # its purpose: ARM boards without JetPack
            assert {"opencv-python-headless", "onnxruntime"} <= pulled
            continue
        assert not pulled & SHADOWING, (name, sorted(pulled & SHADOWING))
    # Control: the walk is real - on x86_64 the train extra pulls OpenCV through grad-cam.
    pulled, _ = _closure(groups["train"], "x86_64")
    assert "grad-cam" in pulled and "opencv-python-headless" in pulled
