"""``fundus-edge run``: sources, the Predictor, rendering, sinks, the threaded pipeline,
faults (missing camera, lost camera, bad files, signals) and a 10,000-frame soak."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

# pytest puts tests/ on sys.path (rootdir conftest, no package): share the model builders.
from test_backends import LABELS, make_metadata, make_onnx_model
from typer.testing import CliRunner

import fundus_edge.cli.cmd_run  # noqa: F401  (registers `run` before the lead does)
from fundus_edge.backends import Backend
from fundus_edge.cli.app import app
from fundus_edge.convert.calibration import synthetic_frames
from fundus_edge.errors import UserError
from fundus_edge.runtime import Predictor, RunConfig, open_source, run
from fundus_edge.runtime.clip import expand_inputs
from fundus_edge.runtime.pipeline import RunSummary, _Channel
from fundus_edge.runtime.render import render
from fundus_edge.runtime.sources import (
    CameraSource,
    CsiSource,
    Frame,
    ImageFilesSource,
    SimCameraSource,
    Source,
    StreamSource,
    VideoFileSource,
    csi_pipeline,
    list_image_files,
)

runner = CliRunner()
RUN = [
    sys.executable,
    "-c",
    "import fundus_edge.cli.cmd_run; from fundus_edge.cli.app import app; app()",
]


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test fundus")
    return cv2.resize(skdata.retina(), (320, 320), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return make_onnx_model(tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture
def folder(tmp_path, retina) -> Path:
    """Two good images, a dark one (fails the gate), a corrupt PNG and a text file."""
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), retina[:, :, ::-1])
    cv2.imwrite(str(d / "b.jpg"), np.ascontiguousarray(retina[:, ::-1, ::-1]))
    cv2.imwrite(str(d / "c_dark.png"), (retina // 20)[:, :, ::-1])
    (d / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "notes.txt").write_text("hello")
    return d


class FakeBackend(Backend):
    """Fast, deterministic: DR positive with its map hot at one cell of an 8x8 grid."""

    name = "fake"

    def __init__(self, meta: dict, hot: tuple[int, int] = (2, 5), grid: int = 8) -> None:
        self.path = Path("fake-model.onnx")
        self.metadata = meta
        self.hot, self.grid = hot, grid
        self.calls = 0

    def _infer(self, batch):
        self.calls += 1
        n, c, g = len(batch), len(self.metadata["label_names"]), self.grid
        probs = np.tile(np.array([0.9, 0.8, 0.1], np.float32)[:c], (n, 1))
        cams = np.zeros((n, 1, c, g, g), np.float32)
        cams[:, :, :, self.hot[0], self.hot[1]] = 2.0
        return {"probs": probs, "cams": cams, "attention": cams[:, :, 0]}


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def write_video(path: Path, n: int, size=(96, 64), fps=10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[..., 2] = 200  # BGR red
        img[: 2 + i, :, 1] = 100
        writer.write(img)
    writer.release()
    return path


def drain(src: Source, limit: int = 1000) -> list[Frame]:
    frames = []
    with src:
        while len(frames) < limit and (f := src.read()) is not None:
            frames.append(f)
    return frames


def test_video_file_every_frame_rgb_and_loop(tmp_path):
    path = write_video(tmp_path / "v.avi", 12)
    src = open_source(str(path))
    assert isinstance(src, VideoFileSource) and not src.live
    frames = drain(src)
    assert [f.index for f in frames] == list(range(12))
    assert frames[0].image.shape == (64, 96, 3)
    assert frames[0].image[..., 0].mean() > 150 > frames[0].image[..., 2].mean()  # RGB order
    assert frames[3].position_s == pytest.approx(0.3)
    looped = drain(open_source(str(path), loop=True), limit=30)
    assert len(looped) == 30 and looped[-1].index == 29


def test_folder_skips_corrupt_images_and_ignores_non_images(folder):
    src = open_source(str(folder))
    assert isinstance(src, ImageFilesSource)
    frames = drain(src)
    assert [Path(f.name).name for f in frames] == ["a.png", "b.jpg", "c_dark.png"]
    skipped = {Path(s.item).name: s.reason for s in src.skipped}
    # notes.txt is not an image by its name: ignored, not skipped.
    assert set(skipped) == {"d_corrupt.png"}
    assert "cannot read image" in skipped["d_corrupt.png"]


def test_one_folder_rule_for_run_and_clip(tmp_path, retina):
    d = tmp_path / "mixed"
    d.mkdir()
    for name in ("b.png", "A.JPG", "c.webp", ".hidden.png"):
        cv2.imwrite(str(d / name), retina[:, :, ::-1])
    (d / "notes.txt").write_text("hello")
    (d / "clip.mp4").write_bytes(b"not listed")
    (d / "sub.png").mkdir()  # a folder with an image's name
    expected = ["A.JPG", "b.png", "c.webp"]
    assert [p.name for p in list_image_files(d)] == expected
    assert [p.name for p in open_source(str(d)).paths] == expected
    assert [p.name for p in expand_inputs([d])] == expected  # clip lists the same files
    # Ignored files do not fail --strict; the run reads every listed image.
    cfg = RunConfig(model="x", source=str(d), headless=True, strict=True)
    summary = run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    assert summary.frames_read == 3 and summary.skipped == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files found"):
        list_image_files(tmp_path / "empty")
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"text: no image files found \(looks for .png"):
        open_source(str(only_text))


def test_glob_and_single_image(folder, retina):
    frames = drain(open_source(str(folder / "*.png")))
    assert [Path(f.name).name for f in frames] == ["a.png", "c_dark.png"]
    one = drain(open_source(str(folder / "a.png")))
    assert len(one) == 1 and one[0].image.shape == retina.shape
    np.testing.assert_array_equal(one[0].image, retina)


def test_source_spec_dispatch_and_errors(tmp_path):
    assert isinstance(open_source(0), CameraSource)
    assert isinstance(open_source("3"), CameraSource)
    assert isinstance(open_source("/dev/video2"), CameraSource)
    assert isinstance(open_source("csi://1"), CsiSource)
    assert isinstance(open_source("rtsp://10.0.0.9/stream"), StreamSource)
    assert isinstance(open_source("http://cam.local/mjpg"), StreamSource)
    with pytest.raises(UserError, match="no such file, folder or camera"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(UserError, match="matches no files"):
        open_source(str(tmp_path / "*.png"))
    with pytest.raises(UserError, match="csi://N"):
        open_source("csi://front")
    for empty in ("", "   "):  # Path("") would be the current folder
        with pytest.raises(UserError, match="empty SOURCE"):
            open_source(empty)
    pipe = csi_pipeline(1, 1280, 720, 60)
    assert (
        "nvarguscamerasrc sensor-id=1" in pipe and "width=1280, height=720, framerate=60/1" in pipe
    )
    assert pipe.rstrip().endswith("sync=false")


def test_simulated_camera_keeps_its_rate_and_a_slow_reader_gets_the_newest_frame():
    src = open_source("sim://320x240@50")
    assert isinstance(src, SimCameraSource) and src.live and src.video
    with src:
        assert src.nominal_fps == 50
        t0 = time.monotonic()
        frames = [src.read() for _ in range(11)]
        took = time.monotonic() - t0
        assert all(f is not None for f in frames)
        assert frames[0].image.shape == (240, 320, 3) and frames[0].image.dtype == np.uint8
        assert [f.index for f in frames] == list(range(11))
        assert 0.15 <= took < 2.0  # frame 10 is captured 0.2 s after frame 0
        assert not frames[0].image.flags.writeable  # the camera's buffer, handed over read-only
        assert frames[0].image[120, 160, 0] > 60 and frames[0].image[5, 5].max() < 30  # a fundus
        time.sleep(0.3)  # ~15 frames captured meanwhile; the reader gets only the newest
        late = src.read()
        assert src.missed >= 8 and late.timestamp >= frames[-1].timestamp + 0.25
        src.interrupt.set()
        assert src.read() is None and src.end_reason == "interrupted"


def test_simulated_camera_specs():
    default = open_source("sim://")
    assert (default.width, default.height, default.fps) == (1920, 1080, 30.0)
    s = open_source("sim://640x480@12.5")
    assert (s.width, s.height, s.fps) == (640, 480, 12.5)
    s = open_source("sim://640x480", width=800, fps=5)  # options given win, as for cameras
    assert (s.width, s.height, s.fps) == (800, 480, 5.0)
    for bad in ("sim://big", "sim://32x32@5", "sim://640x480@0", "sim://640x480@"):
        with pytest.raises(UserError, match="sim://"):
            open_source(bad)


def test_simulated_camera_reopens_without_drawing_its_pictures_again():
    src = open_source("sim://160x120@50")
    src.open()
    pictures = list(src._frames)
    first = src.read()
    src.open()  # run() opens a source it is given: only the clock restarts
    assert all(a is b for a, b in zip(src._frames, pictures, strict=True))
    again = src.read()
    assert again is not None and np.array_equal(again.image, first.image)
    src.close()
    src.open()  # after close, a fresh draw of the same pictures (same seed)
    assert np.array_equal(src.read().image, first.image)
    src.close()


@pytest.mark.parametrize("size", ["320x240", "1280x720"])
def test_simulated_camera_frames_pass_the_default_quality_gate(size):
    """`run sim://` shows predictions: the camera's picture is one the default gate passes
    (seed 0's first synthetic photograph at 1080 px is graded blurry)."""
    from fundus_edge.preprocess import find_fov
    from fundus_edge.quality import assess_quality

    for seed in (0, 1):
        w, h = (int(v) for v in size.split("x"))
        src = SimCameraSource(f"sim://{size}@50", w, h, 50.0, seed=seed)
        src.open()
        frame = src.read().image
        src.close()
        q = assess_quality(frame, find_fov(frame))
        assert q.passed, (size, seed, q.reason, q.sharpness)


@pytest.mark.parametrize("channels", [3, 4])
def test_bgr_and_rgba_frames_convert_exactly_and_stay_contiguous(channels):
    from fundus_edge.preprocess import as_rgb_uint8

    img = np.random.default_rng(channels).integers(0, 256, (37, 53, channels), dtype=np.uint8)
    for view in (img, img[::2, 1::3], img[::-1]):  # contiguous, strided, negative stride
        for bgr in (False, True):
            want = view[:, :, :3][:, :, ::-1] if bgr else view[:, :, :3]
            got = as_rgb_uint8(view, bgr=bgr)
            assert got.flags.c_contiguous and np.array_equal(got, want)
    rgb = np.ascontiguousarray(img[:, :, :3])
    assert as_rgb_uint8(rgb) is rgb  # RGB in: itself, no copy


def test_preprocess_leaves_a_read_only_frame_as_it_came(retina):
    from fundus_edge.preprocess import PreprocessConfig, preprocess

    # The field's square is the whole image at the model's size: the crop is the image
    # itself, then masked (in place, on a copy).
    frame = retina[2:317, 2:317].copy()
    frame.flags.writeable = False
    pre = preprocess(frame, PreprocessConfig(size=315))
    assert (pre.geometry.x0, pre.geometry.y0, pre.geometry.side) == (0, 0, 315)
    assert not np.shares_memory(pre.image, frame)
    assert np.count_nonzero(pre.image.max(axis=-1) == 0) > np.count_nonzero(frame.max(axis=-1) == 0)


def test_inference_threads_option(onnx_model, retina):
    with Predictor(onnx_model) as default, Predictor(onnx_model, threads=1) as one:
        a, b = default.predict(retina), one.predict(retina)
    assert np.allclose(a.probabilities, b.probabilities, atol=1e-6)
    with pytest.raises(UserError, match="--threads must be >= 1"):
        Predictor(onnx_model, threads=0)
    with Predictor(onnx_model) as p, pytest.raises(UserError, match="loaded backend"):
        Predictor(p.backend, threads=1)
    with pytest.raises(UserError, match="--threads must be >= 1"):
        run(RunConfig(model=onnx_model, source="sim://", threads=0), handle_signals=False)
    s = run(
        RunConfig(
            model=onnx_model, source="sim://160x120@50", headless=True, threads=1, max_frames=3
        ),
        handle_signals=False,
    )
    assert s.frames_processed >= 1


def test_run_tracks_a_videos_field_of_view_and_fits_each_still(onnx_model, tmp_path, retina):
    canvas = np.zeros((360, 480, 3), np.uint8)
    canvas[20:340, 80:400] = retina
    video = tmp_path / "exam.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (480, 360))
    noise = np.random.default_rng(0)
    for _ in range(8):
        frame = np.clip(canvas + noise.normal(0, 2, canvas.shape), 0, 255).astype(np.uint8)
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()

    def records(track: bool, source: str, predictor: Predictor) -> list[dict]:
        got: list[dict] = []
        cfg = RunConfig(model=onnx_model, source=source, headless=True, track_fov=track)
        run(
            cfg, predictor=predictor, on_output=lambda o: got.append(o.record), handle_signals=False
        )
        return got

    tracking = Predictor(onnx_model, track_fov=True)
    tracked = records(True, str(video), tracking)
    assert tracking.fov_tracker is not None and tracking.fov_tracker.fits == 1
    plain = Predictor(onnx_model)
    fitted = records(False, str(video), plain)
    assert plain.fov_tracker is None  # the caller's predictor comes back as it went in
    assert len(tracked) == len(fitted) == 8
    first = fitted[0]["fov"]
    assert all(r["fov"] == first for r in tracked)  # the first frame's fit, kept
    for t, f in zip(tracked, fitted, strict=True):
        assert abs(f["fov"]["cx"] - first["cx"]) < 0.02 * first["r"]  # fits agree to ~1 %
        assert t["quality"]["reason"] == f["quality"]["reason"]
        for label, p in t["probabilities"].items():
            assert abs(p - f["probabilities"][label]) < 0.02

    # Stills are fitted one by one whatever track_fov says: results as predict() gives them.
    stills = tmp_path / "stills"
    stills.mkdir()
    for i, shift in enumerate((0, 40, 80)):
        img = np.zeros((360, 480, 3), np.uint8)
        img[20:340, shift : shift + 320] = retina
        cv2.imwrite(str(stills / f"{i}.png"), img[:, :, ::-1])
    got = records(True, str(stills), plain)
    for i, rec in enumerate(got):
        alone = plain.predict(cv2.imread(str(stills / f"{i}.png"))[:, :, ::-1])
        assert rec["fov"] == alone.to_record()["fov"]
        assert rec["probabilities"] == alone.to_record()["probabilities"]


def test_live_video_is_written_at_its_own_rate_and_nothing_is_drawn_without_a_visual_sink(
    onnx_model, tmp_path
):
    # A camera at 100 FPS, a video at 10: the video gets ~10 frames a second, not every one.
    cam = SimCameraSource("sim://160x120@100", 160, 120, 100.0)
    out = tmp_path / "live.mp4"
    cfg = RunConfig(
        model=onnx_model, source=cam, headless=True, save_video=out, fps=10.0, max_frames=80
    )
    s = run(cfg, handle_signals=False)
    assert s.frames_processed >= 10
    written = int(next(o for o in s.outputs if "live.mp4" in o).split("(")[1].split()[0])
    assert 1 <= written <= 10.0 * s.elapsed_s + 2 < s.frames_processed
    assert s.stage_ms.get("render") is not None
    # Only a log: no frame is rendered at all.
    s = run(
        RunConfig(
            model=onnx_model,
            source=SimCameraSource("sim://160x120@100", 160, 120, 100.0),
            headless=True,
            jsonl=tmp_path / "l.jsonl",
            max_frames=20,
        ),
        handle_signals=False,
    )
    assert s.frames_processed > 0 and "render" not in s.stage_ms


def test_cli_runs_a_simulated_camera_with_and_without_fov_tracking(onnx_model, tmp_path):
    for extra in ([], ["--no-fov-track"]):
        log = tmp_path / f"sim{len(extra)}.jsonl"
        args = ["run", str(onnx_model), "sim://200x150@40", "--headless", "--max-frames", "6"]
        res = runner.invoke(app, [*args, "--jsonl", str(log), *extra], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        assert recs and all(r["fov"]["found"] for r in recs)


def test_cli_threads_reach_the_runtime_and_bad_counts_are_one_line(onnx_model, tmp_path):
    log = tmp_path / "t.jsonl"
    args = ["run", str(onnx_model), "sim://200x150@40", "--headless", "--max-frames", "3"]
    res = runner.invoke(app, [*args, "--threads", "1", "--jsonl", str(log)])
    assert res.exit_code == 0, res.output
    assert len(log.read_text().splitlines()) == 3
    res = runner.invoke(app, [*args, "--threads", "0"])
    assert res.exit_code == 2
    assert "--threads must be >= 1" in res.output


class JitterBackend(FakeBackend):
    """Concurrent, with calls that take 0-6 ms at random: streams finish out of order. Each
    frame's first probability is its image's mean / 255, so a record names its frame."""

    concurrent = True

    def __init__(self, meta: dict) -> None:
        super().__init__(meta)
        self._rng = np.random.default_rng(0)
        self._lock = threading.Lock()
        self.overlapped = 0
        self._inside = 0

    def _pause(self) -> float:
        return float(self._rng.uniform(0, 0.006))

    def _infer(self, batch):
        with self._lock:
            self._inside += 1
            self.overlapped = max(self.overlapped, self._inside)
            pause = self._pause()
        time.sleep(pause)
        out = super()._infer(batch)
        out["probs"][:, 0] = batch.reshape(len(batch), -1).mean(1) / 255.0
        with self._lock:
            self._inside -= 1
        return out


class SerialBackend(JitterBackend):
    """One call at a time (``concurrent`` False), each 2 ms; counts calls that overlapped."""

    concurrent = False

    def _pause(self) -> float:
        return 0.002


def test_streams_keep_frame_order_smoothing_and_prepare_side_by_side(onnx_model, tmp_path):
    n = 40
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for i in range(n):
        img = synthetic_frames(1, 120, i)[0]
        frame = np.zeros((120, 160, 3), np.uint8)
        frame[:, 20:140] = img
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    meta = Predictor(onnx_model).metadata

    preparing = {"now": 0, "most": 0, "threads": set()}
    guard = threading.Lock()

    def records(streams: int, backend: Backend) -> list[dict]:
        got: list[dict] = []
        cfg = RunConfig(
            model=onnx_model, source=str(video), headless=True, streams=streams, smoothing=0.5
        )
        predictor = Predictor(backend, gate=False)
        plain = predictor.prepare

        def watched(image, circle):  # how many frames are prepared at once, and by whom
            with guard:
                preparing["now"] += 1
                preparing["most"] = max(preparing["most"], preparing["now"])
                preparing["threads"].add(threading.current_thread().name)
                preparing["cv"].add(cv2.getNumThreads())
            time.sleep(0.003)
            try:
                return plain(image, circle)
            finally:
                with guard:
                    preparing["now"] -= 1

        predictor.prepare = watched
        preparing.update(most=0, threads=set(), cv=set())
        run(
            cfg, predictor=predictor, on_output=lambda o: got.append(o.record), handle_signals=False
        )
        return got

    cv_threads = cv2.getNumThreads()
    one = records(1, JitterBackend(meta))
    assert preparing["cv"] == {cv_threads}  # one worker keeps OpenCV's pool
    jitter = JitterBackend(meta)
    three = records(3, jitter)
    assert jitter.overlapped >= 2  # calls did run at once
    assert preparing["most"] >= 2 and len(preparing["threads"]) == 3  # three prepare workers
    # The workers are the parallelism: OpenCV runs one thread in each, and is restored after.
    assert preparing["cv"] == {1} and cv2.getNumThreads() == cv_threads
    assert [r["frame"] for r in three] == [r["frame"] for r in one] == list(range(n))
    # Smoothing is stateful: equal values prove the results were finished in frame order.
    assert [r["probabilities"] for r in three] == [r["probabilities"] for r in one]
    # The real model through ONNX Runtime: the same records on 1 and 2 streams.
    real = [records(k, Predictor(onnx_model, threads=1).backend) for k in (1, 2)]
    assert [r["probabilities"] for r in real[0]] == [r["probabilities"] for r in real[1]]
    # A backend that takes one call at a time: frames are still prepared two at a time (the
    # field of view tracked in frame order), the model runs them in turn.
    serial = SerialBackend(meta)
    two = records(2, serial)
    assert serial.overlapped == 1 and preparing["most"] == 2
    assert [r["probabilities"] for r in two] == [r["probabilities"] for r in one]
    assert [r["fov"] for r in two] == [r["fov"] for r in one]
    # A frame that fails in one of three prepare workers ends the run with its error, at once
    # (the other workers and the streams stop; nothing hangs), after the frames before it.
    broken = Predictor(JitterBackend(meta), gate=False)
    plain, seen = broken.prepare, []

    def fails_from_7(image, circle):
        if len(seen) >= 7:  # (any worker, once seven frames were prepared)
            raise UserError("frame 7: unreadable")
        seen.append(1)
        return plain(image, circle)

    broken.prepare = fails_from_7
    got: list[dict] = []
    t0 = time.monotonic()
    with pytest.raises(UserError, match="frame 7: unreadable"):
        run(
            RunConfig(model=onnx_model, source=str(video), headless=True, streams=3),
            predictor=broken,
            on_output=lambda o: got.append(o.record),
            handle_signals=False,
        )
    assert time.monotonic() - t0 < 30 and [r["frame"] for r in got] == list(range(len(got)))
    with pytest.raises(UserError, match=r"--streams must be in 1\.\.16"):
        run(RunConfig(model=onnx_model, source="sim://", streams=0), handle_signals=False)
    log = tmp_path / "s.jsonl"
    args = ["run", str(onnx_model), "sim://200x150@40", "--headless", "--max-frames", "5"]
    res = runner.invoke(app, [*args, "--threads", "1", "--streams", "2", "--jsonl", str(log)])
    assert res.exit_code == 0, res.output
    assert len(log.read_text().splitlines()) == 5
    res = runner.invoke(app, [*args, "--streams", "17"])
    assert res.exit_code == 2 and "--streams must be in 1..16" in res.output


def _burn(seconds: float) -> None:
    """This thread's CPU for ``seconds`` (its own clock), hashing with the GIL released."""
    import hashlib

    data, end = bytes(1 << 16), time.thread_time() + seconds
    while time.thread_time() < end:
        hashlib.sha256(data)


class BusyBackend(FakeBackend):
    """Each call costs the calling thread 4 ms of CPU."""

    def _infer(self, batch):
        _burn(0.004)
        return super()._infer(batch)


@pytest.mark.parametrize("streams", [1, 2])
def test_summary_reports_each_threads_cpu_per_frame(onnx_model, tmp_path, streams):
    """Known CPU in the inference and prepare threads shows in their groups (each thread's own
    clock); rendering counts only with a visual sink; the rest of the process is "other"."""
    video = write_video(tmp_path / "v.avi", 12, size=(160, 120))
    meta = Predictor(onnx_model).metadata

    def summary(**sinks) -> RunSummary:
        predictor = Predictor(BusyBackend(meta), gate=False)
        plain = predictor.prepare

        def prepare(image, circle):  # 2 ms of CPU more a frame in the prepare workers
            _burn(0.002)
            return plain(image, circle)

        predictor.prepare = prepare
        cfg = RunConfig(
            model=onnx_model, source=str(video), headless=True, streams=streams, **sinks
        )
        return run(cfg, predictor=predictor, handle_signals=False)

    s = summary(jsonl=tmp_path / f"r{streams}.jsonl")
    cpu = s.cpu_ms
    assert list(cpu) == ["capture", "prepare", "inference", "logs", "other", "all"]
    assert s.frames_processed == 12 and s.cores >= 1
    assert 4.0 <= cpu["inference"] < 40.0 and 2.0 <= cpu["prepare"] < 40.0
    assert all(v >= 0.0 for v in cpu.values())
    line = next(x for x in s.lines() if x.startswith("CPU per frame: "))
    assert f"inference {cpu['inference']:.2f}" in line and "ms in all" in line
    assert s.to_dict()["cpu_ms"] == cpu

    drawn = summary(save_dir=tmp_path / f"frames{streams}")
    assert drawn.cpu_ms["draw"] > 0.0 and list(drawn.cpu_ms)[4:] == ["draw", "other", "all"]


def test_missing_camera_is_one_line_fast():
    t0 = time.monotonic()
    src = open_source(57)
    with pytest.raises(UserError, match=r"camera 57: no such camera \(/dev/video57 does not exist"):
        src.open()
    assert time.monotonic() - t0 < 5.0


class FlakyCapture:
    """A cv2.VideoCapture stand-in that delivers ``n`` frames then fails."""

    def __init__(self, n, opens=True):
        self.n, self.opens = n, opens

    def isOpened(self):
        return self.opens

    def read(self):
        if self.n <= 0:
            return False, None
        self.n -= 1
        return True, np.full((24, 32, 3), 120, np.uint8)

    def set(self, *a):
        return True

    def get(self, prop):
        return 0.0

    def release(self):
        pass


class FlakyStream(StreamSource):
    def __init__(self, plan, **kw):
        super().__init__("rtsp://flaky", **kw)
        self.plan = list(plan)  # frames per (re)connection; then connections fail

    def _capture(self):
        return FlakyCapture(self.plan.pop(0)) if self.plan else FlakyCapture(0, opens=False)


def test_live_source_reconnects_then_gives_up():
    src = FlakyStream([3, 2], reconnect=0.6)
    t0 = time.monotonic()
    frames = drain(src)
    assert len(frames) == 5 and src.reconnects == 1
    assert src.end_reason.startswith("camera lost")
    assert 0.5 < time.monotonic() - t0 < 3.0


def test_latest_channel_keeps_newest_and_bounded_channel_blocks():
    ch = _Channel(1, latest=True)
    for i in range(5):
        assert ch.put(i)
    assert ch.get() == 4 and ch.dropped == 4
    bounded = _Channel(2, latest=False)
    bounded.put(1)
    bounded.put(2)
    t = threading.Thread(target=bounded.put, args=(3,))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waits for room
    assert bounded.get() == 1
    t.join(2)
    bounded.close()
    assert [bounded.get(), bounded.get(), bounded.get()] == [2, 3, None]


# ------------------------------------------------------------------------------------------------
# Predictor and rendering
# ------------------------------------------------------------------------------------------------


def test_predictor_on_real_onnx_and_fundus(onnx_model, retina):
    with Predictor(onnx_model) as p:
        assert p.label_names == LABELS and p.backend.name == "onnxruntime"
        res = p.predict(retina)
    assert res.inferred and res.quality.passed and res.geometry.circle.found
    assert res.probabilities.shape == (3,) and np.all(
        (res.probabilities > 0) & (res.probabilities < 1)
    )
    assert res.positive == [n for n, q in zip(LABELS, res.probabilities, strict=True) if q >= 0.5]
    assert res.maps.shape == (3, 8, 8) and res.attention.shape == (8, 8)
    assert res.cams.shape == (1, 3, 8, 8)
    assert set(res.timings) >= {"preprocess", "quality", "infer", "postprocess"}
    heat = res.map_on_frame("DR")
    assert heat.shape == retina.shape[:2] and heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6
    rec = res.to_record()
    assert set(rec["probabilities"]) == set(LABELS) and rec["quality"]["passed"] is True
    json.dumps(rec, allow_nan=False)


def test_quality_gate_and_smoothing(retina):
    meta = make_metadata()
    p = Predictor(FakeBackend(meta), smoothing=0.5)
    dark = p.predict(retina // 20)
    assert (
        not dark.inferred and dark.quality.reason == "underexposed" and dark.probabilities is None
    )
    assert p.backend.calls == 0  # the gate saved an inference
    ungated = Predictor(FakeBackend(meta), gate=False).predict(retina // 20)
    assert ungated.inferred
    first = p.predict(retina)
    np.testing.assert_allclose(first.probabilities, [0.9, 0.8, 0.1])
    p.backend.metadata = meta  # same model; now feed a different output through finish()
    prep = p.prepare(retina)
    second = p.finish(prep, {"probs": np.array([0.1, 0.0, 0.9], np.float32)})
    np.testing.assert_allclose(second.probabilities, [0.5, 0.4, 0.5])  # 0.5 * old + 0.5 * new
    np.testing.assert_allclose(second.raw_probabilities, [0.1, 0.0, 0.9])
    assert second.positive == ["Disease_Risk", "ARMD"]


def test_overlay_drawn_at_the_right_place(retina):
    # A non-square frame: the fundus sits 100 px from the left, so the crop is offset.
    frame = np.zeros((320, 520, 3), np.uint8)
    frame[:, 100:420] = retina
    meta = make_metadata()
    res = Predictor(FakeBackend(meta, hot=(2, 5))).predict(frame)
    assert res.top_label == "DR"
    g = res.geometry
    s = g.size
    # Centre of map cell (row 2, col 5) of an 8x8 map on the model input, then on the frame.
    (ex, ey) = g.to_frame(np.array([(5 + 0.5) * s / 8 - 0.5, (2 + 0.5) * s / 8 - 0.5]))
    heat = res.map_on_frame("DR")
    py, px = np.unravel_index(np.argmax(heat), heat.shape)
    cell = g.side / 8
    assert abs(px - ex) < cell / 2 and abs(py - ey) < cell / 2
    assert 250 < ex < 400  # really offset by the frame's left band
    out = render(frame, res, which="auto")
    diff = np.abs(out.astype(int) - frame.astype(int)).sum(axis=2)
    r = 4
    assert diff[round(ey) - r : round(ey) + r, round(ex) - r : round(ex) + r].mean() > 60
    # Mirror cell (row 5, col 2): no heat there, no text, away from the FOV circle.
    (mx, my) = g.to_frame(np.array([(2 + 0.5) * s / 8 - 0.5, (5 + 0.5) * s / 8 - 0.5]))
    assert diff[round(my) - r : round(my) + r, round(mx) - r : round(mx) + r].max() == 0


# ------------------------------------------------------------------------------------------------
# The pipeline and the CLI
# ------------------------------------------------------------------------------------------------

RECORD_KEYS = {
    "source", "frame", "timestamp", "image", "rel", "eye", "dicom", "position_s", "quality", "inferred",
    "probabilities", "positive", "screening", "fov", "ms",
}  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_jsonl_savedir_and_strict(onnx_model, folder, tmp_path):
    log = tmp_path / "out.jsonl"
    cfg = RunConfig(
        model=onnx_model, source=str(folder), headless=True, jsonl=log, save_dir=tmp_path / "vis"
    )
    summary = run(cfg, handle_signals=False)
    recs = read_jsonl(log)
    assert len(recs) == 3 == summary.frames_processed
    for i, rec in enumerate(recs):
        assert set(rec) == RECORD_KEYS and rec["frame"] == i
        assert set(rec["ms"]) >= {"preprocess", "quality", "postprocess"}
    assert recs[0]["inferred"] and set(recs[0]["probabilities"]) == set(LABELS)
    assert Path(recs[0]["image"]).name == "a.png" and recs[0]["source"] == str(folder)
    assert recs[2]["quality"]["reason"] == "underexposed" and recs[2]["probabilities"] is None
    assert summary.frames_gated == 1 and len(summary.skipped) == 1
    assert [r["rel"] for r in recs] == ["a.png", "b.jpg", "c_dark.png"]
    assert all(r["eye"] is None and r["dicom"] is None for r in recs)
    # The CSV beside the JSONL: a header and one row per record, same order.
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0].startswith("source,frame,patient,study,eye,") and rows[0].endswith(",positive")
    assert [r.split(",")[0] for r in rows[1:]] == ["a.png", "b.jpg", "c_dark.png"]
    # Named after the source file (b.jpg keeps its suffix: a b.png beside it would not collide).
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == [
        "a.png",
        "b.jpg.png",
        "c_dark.png",
    ]

    res = runner.invoke(
        app, ["run", str(onnx_model), str(folder), "--headless", "--strict"], catch_exceptions=False
    )
    assert res.exit_code == 2, res.output
    assert "1 item(s) skipped under --strict" in res.output
    assert "d_corrupt.png" in res.output  # the summary lists what was skipped


def test_run_video_save_video_playable(onnx_model, tmp_path, retina):
    src = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 8.0, (320, 320))
    for i in range(9):
        writer.write(np.roll(retina, i, axis=1)[:, :, ::-1].copy())
    writer.release()
    out = tmp_path / "out.mp4"
    res = runner.invoke(
        app,
        [
            "run",
            str(onnx_model),
            str(src),
            "--headless",
            "--save-video",
            str(out),
            "--jsonl",
            str(tmp_path / "l.jsonl"),
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "9 read, 9 processed" in res.output
    cap = cv2.VideoCapture(str(out))
    assert cap.isOpened()
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 9
    assert not list(tmp_path.glob(".out.partial*"))


def test_capture_saves_best_passing_frame(tmp_path, folder):
    shot = tmp_path / "shot.png"
    cfg = RunConfig(model="x", source=str(folder), headless=True, capture=shot, capture_window=5)
    summary = run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    assert summary.captured and summary.stop_reason in ("captured", "end of source")
    rec = json.loads(shot.with_name("shot.png.json").read_text())
    assert rec["quality"]["passed"] and Path(rec["image"]).name in ("a.png", "b.jpg")
    assert cv2.imread(str(shot)).shape == (320, 320, 3)
    # Nothing passes: exit 2 with the reason.
    dark = tmp_path / "dark"
    dark.mkdir()
    cv2.imwrite(str(dark / "x.png"), np.full((64, 64, 3), 3, np.uint8))
    res = runner.invoke(
        app,
        [
            "run",
            str(make_onnx_model(tmp_path / "m.onnx")),
            str(dark),
            "--headless",
            "--capture",
            str(shot),
        ],
    )
    assert res.exit_code == 2 and "no frame passed the quality gate" in res.output
    # The closing report says the file was not written (and was not).
    shot.unlink()
    res = runner.invoke(
        app,
        ["run", str(make_onnx_model(tmp_path / "m.onnx")), str(dark / "x.png"), "--headless",
         "--capture", str(tmp_path / "none.png")],
    )  # fmt: skip
    assert res.exit_code == 2 and not (tmp_path / "none.png").exists()
    assert f"nothing captured; {tmp_path / 'none.png'} not written" in res.output
    assert "wrote" not in res.output, res.output


def test_capture_window_zero_keeps_the_first_good_frame(tmp_path, folder):
    shot = tmp_path / "first.png"
    cfg = RunConfig(
        model="x", source=str(folder), headless=True, capture=shot, capture_window=0, reconnect=0
    )
    summary = run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    assert summary.captured and summary.stop_reason == "captured"
    assert Path(json.loads(shot.with_name("first.png.json").read_text())["image"]).name == "a.png"


class NeverRead(Source):
    """A source that must not be read: the run was to fail before capture began."""

    def open(self) -> None:
        pass

    def read(self) -> Frame | None:
        raise AssertionError("the source was read before the outputs were checked")


@pytest.mark.parametrize(
    ("option", "name"),
    [("capture", "cap.png"), ("save_video", "v.mp4"), ("jsonl", "l.jsonl"), ("save_dir", "vis")],
)
def test_unwritable_outputs_fail_before_the_source_runs(tmp_path, option, name):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a path under a regular file can never be written (root too)
    cfg = RunConfig(model="x", source=NeverRead("never"), headless=True)
    setattr(cfg, option, blocker / name)
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UserError, match=f"^{flag} .*a-file.*cannot") as err:
        run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)
    assert ".tmp" not in str(err.value) and "\n" not in str(err.value)


def test_cli_checks_outputs_source_and_numbers_up_front(onnx_model, folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    base = ["run", str(onnx_model), str(folder), "--headless"]
    for extra, words in (
        (["--summary-json", str(blocker / "s.json")], "--summary-json"),
        (["--capture", str(blocker / "cap.png")], "--capture"),
        (["--fps", "-5"], "--fps must be > 0"),
        (["--fps", "0"], "--fps must be > 0"),
        (["--capture-window", "-4"], "--capture-window must be >= 0"),
        (["--reconnect", "-1"], "--reconnect must be >= 0"),
        (["--reconnect", "nan"], "--reconnect must be >= 0"),
        (["--width", "0"], "--width must be >= 1"),
        (["--height", "-2"], "--height must be >= 1"),
    ):
        res = runner.invoke(app, [*base, *extra])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, (extra, res.output)  # no summary: no run
        assert words in lines[0] and ".tmp" not in lines[0], (extra, res.output)
    # 0 is meaningful for these two (no reconnecting; the first good frame).
    res = runner.invoke(
        app, [*base, "--reconnect", "0", "--capture-window", "0", "--max-frames", "1"]
    )
    assert res.exit_code == 0, res.output
    # An empty SOURCE is not the current folder (which here holds readable images).
    monkeypatch.chdir(folder)
    res = runner.invoke(app, ["run", str(onnx_model), "", "--headless"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
    assert "empty SOURCE" in res.output


def test_cli_nothing_readable_is_exit_2(onnx_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for source, words in (
        (bad, "nothing could be read (1 item(s) skipped, first"),
        (bad / "x.png", "nothing could be read"),
    ):
        res = runner.invoke(app, ["run", str(onnx_model), str(source), "--headless"])
        assert res.exit_code == 2 and words in res.output, res.output
        assert "0 read" in res.output  # the summary still comes first
    (bad / "x.png").unlink()
    (bad / "a.txt").write_text("x")
    res = runner.invoke(app, ["run", str(onnx_model), str(bad), "--headless"])
    assert res.exit_code == 2 and "no image files found" in res.output, res.output


def test_cli_missing_camera_exit_2_one_line(onnx_model):
    t0 = time.monotonic()
    res = runner.invoke(app, ["run", str(onnx_model), "--camera", "57", "--headless"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "camera 57: no such camera" in lines[0], res.output
    assert time.monotonic() - t0 < 5.0
    res = runner.invoke(app, ["run", str(onnx_model), "--headless"])
    assert res.exit_code == 2 and "give exactly one source" in res.output


def test_cli_model_problems_are_one_line(tmp_path, folder):
    res = runner.invoke(app, ["run", str(tmp_path / "none.onnx"), str(folder), "--headless"])
    assert res.exit_code == 2 and "none.onnx: no such model file" in res.output
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    res = runner.invoke(app, ["run", str(engine), str(folder), "--headless"])
    assert res.exit_code == 2 and "m.engine.json" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def test_subprocess_missing_camera_and_sigterm_flushes(onnx_model, folder, tmp_path):
    t0 = time.monotonic()
    res = subprocess.run(
        [*RUN, "run", str(onnx_model), "--camera", "57"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2 and time.monotonic() - t0 < 10  # includes interpreter start
    assert res.stderr.strip().count("\n") == 0 and "no such camera" in res.stderr

    log, video = tmp_path / "live.jsonl", tmp_path / "live.avi"
    cmd = [*RUN, "run", str(onnx_model), str(folder / "*.png"), "--loop", "--no-gate",
           "--headless", "--jsonl", str(log), "--save-video", str(video)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or log.read_text().count("\n") < 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    recs = read_jsonl(log)  # every line is valid JSON: the log ends on a whole line
    assert len(recs) >= 5 and [r["frame"] for r in recs] == list(range(len(recs)))
    assert "interrupted (SIGTERM)" in out and f"{len(recs)} processed" in out
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == len(recs)


# ------------------------------------------------------------------------------------------------
# Soak: memory stays flat over 10,000 frames
# ------------------------------------------------------------------------------------------------


class SyntheticSource(Source):
    def __init__(self, image: np.ndarray, n: int) -> None:
        super().__init__("synthetic")
        self.image, self.n = image, n

    def open(self) -> None:
        pass

    def read(self):
        if self._index >= self.n:
            return None
        img = self.image.copy()
        img[0, 0, 0] = self._index % 256
        return self._frame(img)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for RSS")
def test_soak_10000_frames_memory_flat(tmp_path, retina):
    from fundus_edge.quality import QualityConfig

    meta = make_metadata(size=16, quality=QualityConfig(analysis_size=32).to_dict())
    tiny = cv2.resize(retina, (24, 24), interpolation=cv2.INTER_AREA)
    predictor = Predictor(FakeBackend(meta, hot=(1, 1), grid=4), gate=False)
    samples: list[float] = []
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            samples.append(_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    cfg = RunConfig(
        model="fake", source=SyntheticSource(tiny, 10_000), headless=True,
        jsonl=tmp_path / "soak.jsonl", save_video=tmp_path / "soak.avi",
    )  # fmt: skip
    summary = run(cfg, predictor=predictor, handle_signals=False)
    done.set()
    sampler.join()
    elapsed = time.monotonic() - t0
    # A hang guard, not a speed target (speed is bench/'s): ~10-50 s on the 2-core VMs.
    assert summary.frames_processed == 10_000 and elapsed < 180
    assert (tmp_path / "soak.jsonl").read_text().count("\n") == 10_000
    warm = samples[len(samples) // 5 :]  # after the first fifth: allocators warmed up
    assert len(warm) >= 5
    print(f"soak: {elapsed:.1f} s, RSS {warm[0]:.1f} -> {max(warm):.1f} MB")
    assert max(warm) - warm[0] < 25.0, (warm[0], max(warm))


def test_save_dir_never_lets_two_sources_share_an_output(onnx_model, tmp_path):
    """scans/a/1.png and scans/b/1.png (and 1.jpg beside 1.png) each keep their own overlay."""
    import cv2

    scans = tmp_path / "scans"
    img = np.full((96, 96, 3), 90, np.uint8)
    cv2.circle(img, (48, 48), 40, (40, 80, 160), -1)
    for rel in ("a/1.png", "b/1.png", "a/1.jpg"):
        (scans / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(scans / rel), img)
    out = tmp_path / "vis"
    res = runner.invoke(
        app,
        ["run", str(onnx_model), str(scans / "*" / "1.*"), "--headless", "--no-gate",
         "--save-dir", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a/1.jpg.png", "a/1.png", "b/1.png"]
    assert f"wrote {out} (3 images)" in res.output
