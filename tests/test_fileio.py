"""Atomic writes: normal file modes, and a full disk named in one line with nothing lost."""

from __future__ import annotations

import errno
import os
import resource
import signal
from collections import namedtuple

import pytest

from fundus_edge import fileio
from fundus_edge.errors import EXIT_USER, DiskFullError
from fundus_edge.fileio import atomic_open, atomic_write_text

_Usage = namedtuple("_Usage", "total used free")


def test_atomic_writes_get_normal_file_modes(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "kept.txt").write_text("y")
        os.chmod(tmp_path / "kept.txt", 0o640)
        atomic_write_text(tmp_path / "kept.txt", "z")
        assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o640
        assert (tmp_path / "kept.txt").read_text() == "z"
    finally:
        os.umask(old)


def test_enospc_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"old weights")
    with pytest.raises(DiskFullError) as info, atomic_open(target, "wb") as fh:
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(info.value)
    assert msg.startswith(f"{target}: no space left on device (")
    assert "MiB free there" in msg and "\n" not in msg
    assert info.value.exit_code == EXIT_USER
    assert target.read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]  # no temp left


def test_torch_save_on_a_full_disk_is_a_disk_full_error(tmp_path, monkeypatch):
    """torch.save turns the short write into RuntimeError('unexpected pos'); the free space tells."""
    torch = pytest.importorskip("torch")
    from fundus_edge.trainer.state import save_state as _save_state

    calls = []

    def full(folder):
        calls.append(folder)
        return _Usage(100 << 30, 100 << 30, 1 << 20)

    monkeypatch.setattr(fileio.shutil, "disk_usage", full)
    # RLIMIT_FSIZE in this process, with SIGXFSZ ignored, makes the same short write here.
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(DiskFullError, match=r"state\.pt: no space left on device \(1 MiB") as e:
            _save_state(tmp_path / "state.pt", {"w": torch.zeros(1 << 16)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert "unexpected pos" in str(e.value.__cause__)  # what torch says of a short write
    assert calls == [tmp_path]
    assert not list(tmp_path.glob(".state.pt.*"))


def test_other_errors_pass_through_when_there_is_room(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda folder: _Usage(1 << 40, 0, 1 << 40))
    with pytest.raises(ValueError, match="bad value"), atomic_open(tmp_path / "a.json") as fh:
        fh.write("{")
        raise ValueError("bad value")
    with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / "a.json") as fh:
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_enospc_from_any_writer_in_one_line():
    import typer
    from typer.testing import CliRunner

    from fundus_edge.cli import app

    probe = typer.Typer()

    @probe.command()
    def boom() -> None:  # a writer outside atomic_open, e.g. cv2 or a video sink
        raise OSError(errno.ENOSPC, "No space left on device", "out/overlay.mp4")

    app.add_typer(probe, name="probe-disk")
    try:
        res = CliRunner().invoke(app, ["probe-disk", "boom"])
    finally:
        app.registered_groups[:] = [g for g in app.registered_groups if g.name != "probe-disk"]
    assert res.exit_code == EXIT_USER
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("fundus-edge: error: out/overlay.mp4: no space left on device")
