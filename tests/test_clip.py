"""clip: still images -> a camera-sized video that `run` can read."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from fundus_edge.cli import app
from fundus_edge.runtime.clip import letterbox, make_clip

runner = CliRunner()


def _images(tmp_path, n=3):
    paths = []
    for i in range(n):
        img = np.zeros((120 + 20 * i, 160, 3), np.uint8)
        cv2.circle(img, (80, 60 + 10 * i), 50, (40 * i, 120, 200), -1)
        p = tmp_path / f"im{i}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def test_letterbox_keeps_aspect_and_centres():
    img = np.full((100, 200, 3), 255, np.uint8)
    out = letterbox(img, 64, 64)
    assert out.shape == (64, 64, 3)
    rows = np.where(out[:, 32, 0] > 0)[0]
    assert rows.min() == 16 and rows.max() == 47  # 32 rows of image, centred
    assert out[:, :, 0].min() == 0


def test_make_clip_frame_count_and_content(tmp_path):
    paths = _images(tmp_path)
    info = make_clip(
        [str(tmp_path / "im*.png")], tmp_path / "c.mp4", fps=4, hold=2, width=96, height=64
    )
    assert info == {"path": str(tmp_path / "c.mp4"), "frames": 6, "images": 3}
    cap = cv2.VideoCapture(str(tmp_path / "c.mp4"))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    assert len(frames) == 6 and frames[0].shape == (64, 96, 3)
    assert not list(tmp_path.glob(".c.partial*"))  # the partial file was renamed
    assert paths


def test_clip_cli_and_errors(tmp_path):
    _images(tmp_path, 2)
    res = runner.invoke(
        app, ["clip", str(tmp_path), "--out", str(tmp_path / "v.avi"), "--size", "64x48"]
    )
    assert res.exit_code == 0, res.output
    assert "6 frames from 2 images" in res.output  # default hold 3
    for args, words in (
        ([str(tmp_path / "nope.png")], "nope.png"),
        ([str(tmp_path / "*.jpg")], "matches no file"),
        ([str(tmp_path), "--size", "65x48"], "even"),
        ([str(tmp_path), "--size", "big"], "WIDTHxHEIGHT"),
    ):
        out = tmp_path / "x.mp4"
        res = runner.invoke(app, ["clip", *args, "--out", str(out)])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.output and len(res.output.strip().splitlines()) == 1


def test_clip_checks_the_output_folder_and_ignores_non_images(tmp_path, monkeypatch):
    _images(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("not an image")  # ignored, as `run` ignores it
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # nothing can be written under a regular file (root too)
    res = runner.invoke(app, ["clip", str(tmp_path), "--out", str(blocker / "c.mp4")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "--out" in res.output and "cannot write there" in res.output
    assert "OpenCV" not in res.output
    for args, words in (
        (["--fps", "0"], "--fps must be > 0"),
        (["--fps", "nan"], "--fps must be > 0"),
        (["--hold", "0"], "--hold must be >= 1"),
    ):
        res = runner.invoke(app, ["clip", str(tmp_path), "--out", str(tmp_path / "c.avi"), *args])
        assert res.exit_code == 2 and words in res.output, (args, res.output)
    res = runner.invoke(
        app, ["clip", str(tmp_path), "--out", str(tmp_path / "c.avi"), "--size", "64x48"]
    )
    assert res.exit_code == 0 and "from 2 images" in res.output, res.output
    monkeypatch.chdir(tmp_path)  # "" must not mean the current folder (which has images)
    res = runner.invoke(app, ["clip", "", "--out", str(tmp_path / "d.avi")])
    assert res.exit_code == 2 and "empty input" in res.output, res.output


@pytest.mark.parametrize("suffix", [".gif"])
def test_unknown_video_type(tmp_path, suffix):
    _images(tmp_path, 1)
    res = runner.invoke(app, ["clip", str(tmp_path), "--out", str(tmp_path / f"v{suffix}")])
    assert res.exit_code == 2 and ".mp4" in res.output
