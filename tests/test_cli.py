"""The CLI contract: --help/--version, one-line errors with exit 2, tracebacks only with --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fundus_edge import __version__
from fundus_edge.cli import app

runner = CliRunner()


def _commands() -> list[str]:
    import typer

    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_version_runner():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"fundus-edge {__version__}"


def test_every_command_has_help():
    names = _commands()
    assert "doctor" in names
    for name in names:
        res = runner.invoke(app, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage:" in res.output


def test_unknown_command_is_one_line_exit_2():
    res = runner.invoke(app, ["no-such-command"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert "No such command" in lines[0]
    assert "Traceback" not in res.output


def test_bad_option_is_one_line_exit_2():
    res = runner.invoke(app, ["doctor", "--no-such-option"])
    assert res.exit_code == 2
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert "--no-such-option" in res.output


def test_user_error_maps_to_exit_2_and_debug_shows_traceback():
    import typer

    from fundus_edge.errors import UserError

    probe = typer.Typer()

    @probe.command()
    def boom() -> None:
        raise UserError("data/x.csv: row 3, column DR: value '2' is not 0 or 1")

    # Mount the failing command under our error-handling group, as every real command is.
    app.add_typer(probe, name="probe-test")
    try:
        res = runner.invoke(app, ["probe-test", "boom"])
        assert res.exit_code == 2
        assert res.output.strip() == (
            "fundus-edge: error: data/x.csv: row 3, column DR: value '2' is not 0 or 1"
        )
        res = runner.invoke(app, ["--debug", "probe-test", "boom"])
        assert res.exit_code == 2
        assert "Traceback" in res.output
    finally:
        app.registered_groups[:] = [g for g in app.registered_groups if g.name != "probe-test"]


def test_subprocess_help_version_and_unknown(cli_exe):
    out = subprocess.run([*cli_exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "doctor" in out.stdout
    out = subprocess.run([*cli_exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and __version__ in out.stdout
    out = subprocess.run([*cli_exe, "frobnicate"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "frobnicate" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_does_not_import_heavy_modules():
    # `fundus-edge --help` must not pay for torch/onnx/tensorrt (edge devices have only the base).
    code = (
        "import sys\n"
        "from fundus_edge.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'torchvision', 'sklearn', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"--help imported: {out.stdout.strip()}"


def test_doctor_json_subprocess_without_torch(cli_exe, tmp_path):
    """doctor works with only the base installed: simulate by making torch & friends unimportable."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    for mod in ("torch", "torchvision", "tensorrt", "onnx", "pytorch_grad_cam"):
        (blocker / mod).mkdir()
        (blocker / mod / "__init__.py").write_text(f"raise ImportError('{mod} blocked for test')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    out = subprocess.run(
        [sys.executable, "-m", "fundus_edge", "doctor", "--json", "--no-camera-probe"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["backends"]["torch"]["available"] is False
    assert "blocked" in report["backends"]["torch"]["reason"]
    assert report["backends"]["onnxruntime"]["available"] is True


@pytest.mark.parametrize("args", [["doctor"], ["doctor", "--no-camera-probe"]])
def test_doctor_table_runner(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    for word in ("python", "PyTorch", "ONNX Runtime", "TensorRT", "OpenCV", "Jetson"):
        assert word in res.output


def test_ctrl_c_in_a_command_says_interrupted_and_exits_130():
    import typer

    probe = typer.Typer()

    @probe.command()
    def slow() -> None:
        raise KeyboardInterrupt  # as Ctrl-C arrives in a long command (synth, prepare, bench)

    app.add_typer(probe, name="probe-int")
    try:
        res = runner.invoke(app, ["probe-int", "slow"])
    finally:
        app.registered_groups[:] = [g for g in app.registered_groups if g.name != "probe-int"]
    assert res.exit_code == 130
    assert res.output.strip() == "fundus-edge: interrupted"
