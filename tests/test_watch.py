"""``fundus-edge run MODEL --watch DIR``: the watch folder source, its journal, restarts.

Unit tests drive a :class:`WatchFolderSource` from the test's own loop (a timer only bounds a
blocking read); the acceptance test runs the CLI in a subprocess while a writer thread drops
stills, DICOM files, partial writes and corrupt files into the folder, and restarts it after
SIGTERM half-way.
"""

from __future__ import annotations

import csv
import json
import logging
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
from test_backends import make_metadata, make_onnx_model
from test_runtime import FakeBackend

from fundus_edge.errors import UserError
from fundus_edge.log import get_logger
from fundus_edge.runtime import Predictor, RunConfig, run
from fundus_edge.runtime.pipeline import csv_beside
from fundus_edge.runtime.sinks import Output
from fundus_edge.runtime.watch import (
    JOURNAL_NAME,
    JournalSink,
    WatchFolderSource,
    is_temporary_name,
    journal_path,
    read_journal,
)

RUN = [
    sys.executable,
    "-c",
    "import fundus_edge.cli.cmd_run; from fundus_edge.cli.app import app; app()",
]
SETTLE = 0.3


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the test fundus")
    return cv2.resize(skdata.retina(), (96, 96), interpolation=cv2.INTER_AREA)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    return data.tobytes()


def variant(retina: np.ndarray, i: int) -> np.ndarray:
    """The test fundus, varied slightly (brightness, a shift) so every file differs."""
    img = np.roll(retina, i % 7, axis=1).astype(np.int16) + (i % 11) - 5
    return np.clip(img, 0, 255).astype(np.uint8)


def dicom_bytes(frames: list[np.ndarray], patient: str = "PAT1") -> bytes:
    """A small uncompressed RGB Ophthalmic Photography object (one frame or several)."""
    pytest.importorskip("pydicom", reason="pydicom writes the test DICOM files")
    import tempfile

    from fundus_edge.data.readers.dicom import write_photo

    with tempfile.TemporaryDirectory() as tmp:
        path = write_photo(Path(tmp) / "x.dcm", frames, patient_id=patient, eye="R")
        return path.read_bytes()


def next_frame(src: WatchFolderSource, within: float):
    """``src.read()``, given up after ``within`` seconds (None then)."""
    timer = threading.Timer(within, src.interrupt.set)
    timer.start()
    try:
        return src.read()
    finally:
        timer.cancel()
        src.interrupt.clear()


def frames_within(src: WatchFolderSource, n: int, within: float = 5.0) -> list:
    out = []
    deadline = time.monotonic() + within
    while len(out) < n and time.monotonic() < deadline:
        frame = next_frame(src, max(0.05, deadline - time.monotonic()))
        if frame is not None:
            out.append(frame)
    return out


def make_source(folder: Path, journal: Path, **kw) -> WatchFolderSource:
    kw.setdefault("settle_s", SETTLE)
    kw.setdefault("poll_s", 0.05)
    src = WatchFolderSource(folder, journal, **kw)
    src.open()
    return src


def journal_done(sink: JournalSink, frames: list) -> None:
    """What the pipeline does with a frame once its records are written."""
    for frame in frames:
        sink.write(Output(frame, None, {}))  # type: ignore[arg-type]  (unused here)


@pytest.fixture
def watch_log():
    """The watch logger's messages (the CLI's setup may have stopped propagation)."""
    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = get_logger("watch")
    handler = ListHandler(logging.DEBUG)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


# ------------------------------------------------------------------------------------------------
# The source, driven from the test's own loop
# ------------------------------------------------------------------------------------------------


def test_journal_path_and_temporary_names(tmp_path):
    assert journal_path(tmp_path / "out" / "results.jsonl") == tmp_path / "out" / JOURNAL_NAME
    for name in ("a.png.part", "a.PNG.tmp", "x.partial", "~a.png", "a.crdownload", ".a.png"):
        assert is_temporary_name(name), name
    assert not is_temporary_name("a.png") and not is_temporary_name("1.2.840.5")


def test_missing_or_unlistable_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        WatchFolderSource(tmp_path / "nope", tmp_path / JOURNAL_NAME).open()
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder"):
        WatchFolderSource(tmp_path / "f.png", tmp_path / JOURNAL_NAME).open()


def test_files_appearing_in_order_once_each_ignoring_the_rest(tmp_path, retina):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    src = make_source(folder, tmp_path / JOURNAL_NAME)
    assert not src.live
    (folder / "b.png").write_bytes(png_bytes(variant(retina, 1)))
    time.sleep(0.05)
    (folder / "sub" / "a.png").write_bytes(png_bytes(variant(retina, 2)))
    time.sleep(0.05)
    (folder / "c.dcm").write_bytes(dicom_bytes([variant(retina, 3)]))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(png_bytes(retina))
    (folder / "d.png.part").write_bytes(png_bytes(retina))
    (folder / "~e.png").write_bytes(png_bytes(retina))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "f.png").write_bytes(png_bytes(retina))
    (folder / "empty.png").write_bytes(b"")  # size 0: not finished
    t0 = time.monotonic()
    frames = frames_within(src, 3)
    assert time.monotonic() - t0 >= SETTLE  # nothing is read before it settled
    assert [f.rel for f in frames] == ["b.png", "sub/a.png", "c.dcm"]
    assert frames[0].path == str(folder / "b.png") and frames[0].key == "b.png"
    assert frames[0].stamp == (
        (folder / "b.png").stat().st_size,
        (folder / "b.png").stat().st_mtime_ns,
    )
    assert all(f.last_in_file for f in frames)
    np.testing.assert_array_equal(frames[0].image, variant(retina, 1))
    assert frames[2].dicom is not None and frames[2].dicom.eye == "R"
    assert [f.index for f in frames] == [0, 1, 2]
    assert next_frame(src, 4 * SETTLE) is None  # each once; the rest is never read
    assert src.skipped == []


def test_a_growing_file_is_read_once_complete(tmp_path, retina):
    folder = tmp_path / "in"
    folder.mkdir()
    settle = 0.5  # pauses of 0.15 s: a busy machine does not stretch one past the settle time
    src = make_source(folder, tmp_path / JOURNAL_NAME, settle_s=settle)
    data = png_bytes(variant(retina, 4))
    pieces = 8
    step = len(data) // pieces + 1
    path = folder / "slow.png"
    t0 = time.monotonic()
    with open(path, "wb") as fh:  # written in pieces over 2x the settle time
        for i in range(pieces):
            fh.write(data[i * step : (i + 1) * step])
            fh.flush()
            assert next_frame(src, 0.15) is None, "read before it was complete"
    assert time.monotonic() - t0 >= 2 * settle
    (frame,) = frames_within(src, 1)
    np.testing.assert_array_equal(frame.image, variant(retina, 4))
    assert src.skipped == [] and next_frame(src, 2 * SETTLE) is None


def test_output_folders_inside_the_watched_folder_are_not_read(tmp_path, retina):
    folder = tmp_path / "in"
    (folder / "reports").mkdir(parents=True)
    (folder / "overlays").mkdir()
    src = make_source(folder, folder / "reports" / JOURNAL_NAME, exclude=[folder / "overlays"])
    (folder / "reports" / "visit.png").write_bytes(png_bytes(retina))
    (folder / "overlays" / "a.png").write_bytes(png_bytes(retina))
    (folder / "a.png").write_bytes(png_bytes(retina))
    assert [f.rel for f in frames_within(src, 1)] == ["a.png"]
    assert next_frame(src, 3 * SETTLE) is None


def test_a_renamed_part_file_is_picked_up_at_the_rename(tmp_path, retina):
    folder = tmp_path / "in"
    folder.mkdir()
    src = make_source(folder, tmp_path / JOURNAL_NAME)
    part = folder / "shot.png.part"
    part.write_bytes(png_bytes(variant(retina, 5))[:100])
    assert next_frame(src, 3 * SETTLE) is None  # a temporary name: never read
    part.write_bytes(png_bytes(variant(retina, 5)))
    part.rename(folder / "shot.png")
    (frame,) = frames_within(src, 1)
    assert frame.rel == "shot.png" and src.skipped == []


def test_corrupt_files_are_skipped_journaled_and_not_retried(tmp_path, retina):
    folder = tmp_path / "in"
    folder.mkdir()
    journal = tmp_path / JOURNAL_NAME
    src = make_source(folder, journal)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    time.sleep(0.05)
    (folder / "good.png").write_bytes(png_bytes(retina))
    (frame,) = frames_within(src, 1)  # the source keeps going past the bad ones
    assert frame.rel == "good.png"
    assert {Path(s.item).name for s in src.skipped} == {"bad.png", "bad.dcm"}
    entries, _ = read_journal(journal)
    assert {k: e["status"] for k, e in entries.items()} == {
        "bad.png": "skipped",
        "bad.dcm": "skipped",
    }
    assert entries["bad.png"]["reason"] and entries["bad.png"]["size"] > 0
    assert next_frame(src, 3 * SETTLE) is None and len(src.skipped) == 2  # not retried
    # After a restart: still not retried. Rewritten (a new size and mtime): read again.
    again = make_source(folder, journal, recheck_s=0.1)
    frames = frames_within(again, 1, within=3 * SETTLE)
    assert [f.rel for f in frames] == ["good.png"]  # no JournalSink ran: good.png is not done
    assert again.skipped == []
    (folder / "bad.png").write_bytes(png_bytes(variant(retina, 6)))
    (fixed,) = frames_within(again, 1)
    assert fixed.rel == "bad.png" and again.skipped == []


def test_journal_reload_skips_done_files_and_reads_rewritten_ones(tmp_path, retina, watch_log):
    folder = tmp_path / "in"
    folder.mkdir()
    journal = tmp_path / "out" / JOURNAL_NAME
    journal.parent.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(variant(retina, i)))
    src = make_source(folder, journal)
    frames = frames_within(src, 3)
    sink = JournalSink(journal)
    journal_done(sink, frames[:2])  # the third never reached the log (a crash)
    sink.close()
    assert sink.describe().endswith("(2 files)")
    with open(journal, "a", encoding="utf-8") as fh:
        fh.write('{"file": "2.png", "size": 1')  # a power loss mid-line
    again = make_source(folder, journal, recheck_s=0.1)
    assert [f.rel for f in frames_within(again, 3, within=4 * SETTLE)] == ["2.png"]
    sink = JournalSink(journal)
    journal_done(sink, [frames[2]])
    time.sleep(0.02)
    (folder / "0.png").write_bytes(png_bytes(variant(retina, 9)))  # rewritten in place
    (redo,) = frames_within(again, 1)
    assert redo.rel == "0.png"
    np.testing.assert_array_equal(redo.image, variant(retina, 9))
    journal_done(sink, [redo])
    sink.close()
    assert any("processing it again" in m for m in watch_log)
    lines = journal.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the partial line is gone, every line whole
    done = [json.loads(line) for line in lines]
    assert [e["file"] for e in done] == ["0.png", "1.png", "2.png", "0.png"]
    assert done[-1]["replaces"] == {"size": done[0]["size"], "mtime_ns": done[0]["mtime_ns"]}
    assert done[-1]["status"] == "done" and "at" in done[-1]
    third = make_source(folder, journal, recheck_s=0.1)
    assert next_frame(third, 4 * SETTLE) is None  # all done, also after a restart


def test_multiframe_dicom_every_frame_and_resume_after_interrupt(tmp_path, retina):
    folder = tmp_path / "in"
    folder.mkdir()
    journal = tmp_path / JOURNAL_NAME
    frames_in = [variant(retina, i) for i in range(3)]
    (folder / "multi.dcm").write_bytes(dicom_bytes(frames_in))
    src = make_source(folder, journal)
    frames = frames_within(src, 3)
    assert [f.rel for f in frames] == ["multi.dcm#0", "multi.dcm#1", "multi.dcm#2"]
    assert [f.key for f in frames] == ["multi.dcm"] * 3
    assert [f.last_in_file for f in frames] == [False, False, True]
    np.testing.assert_array_equal(frames[1].image, frames_in[1])
    sink = JournalSink(journal)
    journal_done(sink, frames[:1])  # interrupted after the first frame's records
    sink.close()
    entry = read_journal(journal)[0]["multi.dcm"]
    assert entry["status"] == "partial" and entry["frames"] == 1
    again = make_source(folder, journal)
    rest = frames_within(again, 2)
    assert [f.rel for f in rest] == ["multi.dcm#1", "multi.dcm#2"]
    sink = JournalSink(journal)
    journal_done(sink, rest)
    sink.close()
    entry = read_journal(journal)[0]["multi.dcm"]
    assert entry["status"] == "done" and entry["frames"] == 3
    assert next_frame(make_source(folder, journal), 3 * SETTLE) is None


def test_anonymised_frames_and_journal_carry_no_names(tmp_path, retina):
    from fundus_edge.data.anonymise import Pseudonymiser

    folder = tmp_path / "in"
    folder.mkdir()
    journal = tmp_path / JOURNAL_NAME
    (folder / "Doe_Jane_right.png").write_bytes(png_bytes(retina))
    anon = Pseudonymiser(salt=b"test")
    src = make_source(folder, journal, anonymiser=anon)
    (frame,) = frames_within(src, 1)
    assert frame.rel == anon.path("Doe_Jane_right.png") == frame.key == frame.path
    sink = JournalSink(journal)
    journal_done(sink, [frame])
    sink.close()
    assert "Doe" not in journal.read_text()
    assert next_frame(make_source(folder, journal, anonymiser=anon), 3 * SETTLE) is None


def test_folder_disappearing_and_unreadable_subfolders(tmp_path, retina, watch_log, monkeypatch):
    import shutil

    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    src = make_source(folder, tmp_path / JOURNAL_NAME)
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    (folder / "locked" / "x.png").write_bytes(png_bytes(retina))
    (folder / "ok.png").write_bytes(png_bytes(retina))
    assert [f.rel for f in frames_within(src, 1)] == ["ok.png"]
    assert next_frame(src, 2 * SETTLE) is None
    assert sum("cannot list" in m for m in watch_log) == 1  # logged once, no crash
    monkeypatch.setattr(os, "scandir", real_scandir)
    shutil.rmtree(folder)
    assert next_frame(src, 4 * SETTLE) is None
    assert next_frame(src, 4 * SETTLE) is None
    assert sum("still watching" in m for m in watch_log) == 1  # logged once, still polling
    folder.mkdir()
    (folder / "back.png").write_bytes(png_bytes(retina))
    assert [f.rel for f in frames_within(src, 1)] == ["back.png"]


def test_interrupt_wakes_a_blocked_read_quickly(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    src = make_source(folder, tmp_path / JOURNAL_NAME, poll_s=0.4)
    timer = threading.Timer(0.3, src.interrupt.set)
    timer.start()
    t0 = time.monotonic()
    assert src.read() is None
    assert time.monotonic() - t0 < 0.3 + 0.5 and src.end_reason == "interrupted"


def test_thousands_of_done_files_are_not_restated_every_poll(tmp_path, monkeypatch):
    """Journaled files are only stat'ed again at a recheck, not at every poll."""
    folder = tmp_path / "in"
    folder.mkdir()
    journal = tmp_path / JOURNAL_NAME
    with open(journal, "w", encoding="utf-8") as fh:
        for i in range(3000):
            p = folder / f"{i:04d}.png"
            p.write_bytes(b"x")
            st = p.stat()
            fh.write(
                json.dumps(
                    {"file": p.name, "size": 1, "mtime_ns": st.st_mtime_ns, "status": "done"}
                )
                + "\n"
            )
    src = make_source(folder, journal, recheck_s=60.0)
    assert src._scan(recheck=True) is not None
    t0 = time.perf_counter()
    found = src._scan(recheck=False)
    assert found == [] and time.perf_counter() - t0 < 0.5
    assert next_frame(src, 2 * SETTLE) is None


# ------------------------------------------------------------------------------------------------
# The pipeline: records, the CSV and the journal across runs
# ------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_watch_appends_across_runs_and_journals_done(tmp_path, retina):
    folder = tmp_path / "in"
    folder.mkdir()
    out = tmp_path / "out" / "results.jsonl"
    (folder / "bad.png").write_bytes(b"corrupt")  # the oldest: read first
    time.sleep(0.05)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(variant(retina, i)))
    meta = make_metadata()

    def once(n: int):
        cfg = RunConfig(
            model="fake.onnx", source="unused", headless=True, jsonl=out, watch=folder,
            watch_settle=0.2, max_frames=n,
        )  # fmt: skip
        return run(cfg, predictor=Predictor(FakeBackend(meta)), handle_signals=False)

    first = once(3)
    assert first.frames_processed == 3 and [s.item for s in first.skipped] == [
        str(folder / "bad.png")
    ]
    assert any(o.startswith(str(out.parent / JOURNAL_NAME)) for o in first.outputs)
    (folder / "3.png").write_bytes(png_bytes(variant(retina, 3)))
    second = once(1)
    assert second.frames_processed == 1 and second.skipped == []
    recs = read_jsonl(out)
    assert [r["rel"] for r in recs] == ["0.png", "1.png", "2.png", "3.png"]
    assert recs[0]["source"] == str(folder)
    with open(csv_beside(out), newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "source" and [r[0] for r in rows[1:]] == [r["rel"] for r in recs]
    entries, _ = read_journal(out.parent / JOURNAL_NAME)
    assert {k: e["status"] for k, e in entries.items()} == {
        "0.png": "done", "1.png": "done", "2.png": "done", "3.png": "done", "bad.png": "skipped",
    }  # fmt: skip


def test_run_watch_needs_a_results_file(tmp_path):
    cfg = RunConfig(model="fake.onnx", source="x", headless=True, watch=tmp_path)
    with pytest.raises(UserError, match="--jsonl"):
        run(cfg, predictor=Predictor(FakeBackend(make_metadata())), handle_signals=False)


# ------------------------------------------------------------------------------------------------
# Acceptance: a camera writes 50 files while the CLI runs, is stopped with SIGTERM and restarted
# ------------------------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes stills, DICOM files (one multi-frame), partial writes, a renamed .part file and
    two corrupt files into the watched folder, one every ``gap`` seconds."""

    def __init__(self, folder: Path, retina: np.ndarray, n: int = 50, gap: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.folder, self.retina, self.n, self.gap = folder, retina, n, gap
        self.good: list[str] = []  # expected `rel`s
        self.corrupt: list[str] = []
        self.error: BaseException | None = None

    def plan(self, i: int) -> tuple[str, bytes, str]:
        img = variant(self.retina, i)
        sub = f"day{i // 20}/"
        if i in (13, 37):
            name = f"{sub}broken{i}." + ("png" if i == 13 else "dcm")
            return name, b"\x89PNG\r\n\x1a\n" + os.urandom(300), "corrupt"
        if i % 12 == 5:
            frames = [img, variant(self.retina, i + 100)] if i == 5 else [img]
            return f"{sub}img{i:02d}.dcm", dicom_bytes(frames, patient=f"P{i}"), "dicom"
        return f"{sub}img{i:02d}.png", png_bytes(img), "png"

    def run(self) -> None:
        try:
            for i in range(self.n):
                name, data, kind = self.plan(i)
                path = self.folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if i % 9 == 4:  # written in pieces, each pause shorter than the settle time
                    with open(path, "wb") as fh:
                        for k in range(4):
                            fh.write(data[k * len(data) // 4 : (k + 1) * len(data) // 4])
                            fh.flush()
                            time.sleep(SETTLE / 3)
                elif i % 9 == 7:  # written under a temporary name, renamed when finished
                    part = path.with_name(path.name + ".part")
                    part.write_bytes(data[: len(data) // 2])
                    time.sleep(SETTLE * 1.5)
                    with open(part, "ab") as fh:
                        fh.write(data[len(data) // 2 :])
                    part.rename(path)
                else:
                    path.write_bytes(data)
                if kind == "corrupt":
                    self.corrupt.append(name)
                elif name.endswith("img05.dcm"):
                    self.good += [f"{name}#0", f"{name}#1"]
                else:
                    self.good.append(name)
                time.sleep(self.gap)
        except BaseException as exc:
            self.error = exc


def _rels(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [json.loads(line)["rel"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_acceptance_watch_restart_each_file_once(tmp_path, retina):
    model = make_onnx_model(tmp_path / "tiny.onnx")
    folder, out = tmp_path / "camera", tmp_path / "out"
    folder.mkdir()
    results = out / "results.jsonl"
    cmd = [*RUN, "run", str(model), "--watch", str(folder), "--jsonl", str(results),
           "--headless", "--watch-settle", str(SETTLE)]  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(proc: subprocess.Popen) -> str:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr[-2000:]
        return stdout

    writer = Writer(folder, retina)
    proc = start()
    writer.start()
    deadline = time.monotonic() + 40
    try:
        while len(_rels(results)) < 20 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        assert len(_rels(results)) >= 20, "the first run did not get half-way"
        first = stop(proc)
        assert "interrupted (SIGTERM)" in first
        proc = start()  # files keep arriving meanwhile
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and (
            writer.is_alive() or not set(writer.good) <= set(_rels(results))
        ):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        time.sleep(4 * SETTLE)  # anything that would come twice has time to
        second = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert writer.error is None
    assert len(writer.good) == 49 and len(writer.corrupt) == 2
    rels = _rels(results)
    assert sorted(rels) == sorted(writer.good)  # every good file (and frame) exactly once
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "source" and sum(r == rows[0] for r in rows) == 1  # one header
    assert sorted(r[0] for r in rows[1:]) == sorted(writer.good)
    entries, _ = read_journal(out / JOURNAL_NAME)
    for name in writer.corrupt:
        assert entries[name]["status"] == "skipped", entries.get(name)
    assert {k for k, e in entries.items() if e["status"] == "done"} == {
        r.partition("#")[0] for r in writer.good
    }
    assert "skipped" in first + second


def test_outputs_inside_the_watched_folder_are_not_read_back(tmp_path, retina):
    """--save-dir and --report inside the watched folder: their files never come back in.

    The run stops after two frames: if vis/a.png came back it would be the second; the second
    must be b.png, written after several polls have seen vis/a.png."""
    import cv2
    from test_backends import make_metadata
    from test_runtime import FakeBackend

    from fundus_edge.runtime import Predictor, RunConfig, run

    watched = tmp_path / "in"
    watched.mkdir()
    cv2.imwrite(str(watched / "a.png"), retina[:, :, ::-1])
    cfg = RunConfig(
        model="x",
        source=str(watched),
        watch=watched,
        watch_settle=0.2,
        headless=True,
        jsonl=watched / "out" / "r.jsonl",
        save_dir=watched / "vis",
        max_frames=2,
    )
    result = {}

    def go():
        predictor = Predictor(FakeBackend(make_metadata()))
        result["summary"] = run(cfg, predictor=predictor, handle_signals=False)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (watched / "vis" / "a.png").is_file():
        time.sleep(0.05)
    time.sleep(1.5)  # several polls with vis/a.png in the watched folder
    cv2.imwrite(str(watched / "b.png"), retina[:, :, ::-1])
    t.join(30)
    assert not t.is_alive()
    recs = [json.loads(x) for x in (watched / "out" / "r.jsonl").read_text().splitlines()]
    assert [r["rel"] for r in recs] == ["a.png", "b.png"], recs


def test_names_differing_only_in_case_are_skipped_and_journaled(tmp_path, retina):
    folder, journal = tmp_path / "in", tmp_path / "out" / "watch-journal.jsonl"
    for sub in ("A", "a"):
        (folder / sub).mkdir(parents=True)
    if len(list(folder.iterdir())) < 2:
        pytest.skip("this file system ignores letter case")
    (folder / "A" / "1.png").write_bytes(png_bytes(retina))
    src = make_source(folder, journal)
    (first,) = frames_within(src, 1)
    assert first.rel == "A/1.png"
    journal_done(JournalSink(journal), [first])
    (folder / "a" / "1.png").write_bytes(png_bytes(retina))
    assert frames_within(src, 1, within=2.0) == []
    assert "but for letter case" in src.skipped[-1].reason
    # Journaled as skipped; a restarted watch knows A/1.png too and skips a/1.png again.
    entries = [json.loads(x) for x in journal.read_text().splitlines()]
    assert {(e["file"], e["status"]) for e in entries} == {
        ("A/1.png", "done"),
        ("a/1.png", "skipped"),
    }
    again = make_source(folder, journal)
    assert frames_within(again, 1, within=1.5) == []
