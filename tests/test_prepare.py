"""``prepare``: layout, manifest, masks, resumability, determinism across worker counts, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_datasets import build_odir, build_rfmid, fundus_png, write_csv
from typer.testing import CliRunner

import fundus_edge.cli.cmd_data  # noqa: F401  (registers dataset/prepare on app)
import fundus_edge.prepare as prep
from fundus_edge.cli.app import app
from fundus_edge.data import open_dataset
from fundus_edge.errors import DataError, UserError
from fundus_edge.prepare import MANIFEST, SETTINGS, prepare_dataset
from fundus_edge.preprocess import Geometry, PreprocessConfig

runner = CliRunner()
SIZE = 32
LABELS = ("Disease_Risk", "DR", "MH")


def build_with_mask(root: Path) -> Path:
    """RFMiD layout A, mixed extensions, one synth-style mask; returns the mask path."""
    build_rfmid(root, "A", LABELS, n=3, exts={"train": ".png", "val": ".jpg", "test": ".TIF"})
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 36:46] = 255  # a 10x10 lesion right of centre
    path = root / "Training_Set" / "Masks" / "2_DR.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), mask)
    return path


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_manifest_and_masks(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_with_mask(src)
    cfg = PreprocessConfig(size=SIZE, contrast="clahe")
    res = prepare_dataset(src, dst, cfg, workers=1)
    assert (res.total, res.processed, res.resumed, res.failures, res.masks) == (9, 9, 0, [], 1)

    before, after = open_dataset(src), open_dataset(dst)
    assert after.problems == [] and after.label_names == before.label_names
    for split in ("train", "val", "test"):
        b = {s.id: s for s in before.splits[split]}
        a = {s.id: s for s in after.splits[split]}
        assert set(a) == set(b)
        for sid, s in a.items():
            assert s.path.relative_to(dst) == b[sid].path.relative_to(src)  # same layout, ext
            np.testing.assert_array_equal(s.labels, b[sid].labels)
            img = cv2.imread(str(s.path), cv2.IMREAD_UNCHANGED)
            assert img.shape[:2] == (SIZE, SIZE)
    for f in before.label_files:  # label files copied byte for byte
        assert (dst / f.relative_to(src)).read_bytes() == f.read_bytes()

    settings = json.loads((dst / SETTINGS).read_text())
    assert settings["preprocess"] == cfg.to_dict() and settings["complete"] is True
    records = [json.loads(x) for x in (dst / MANIFEST).read_text().splitlines()]
    assert len(records) == 9
    assert [r["source"] for r in records] == sorted(r["source"] for r in records)
    for r in records:
        assert r["status"] == "ok" and r["output"] == r["source"]
        assert set(r["fov"]) == {"cx", "cy", "r", "found", "kind"}
        assert r["fov"]["found"] is True and abs(r["fov"]["r"] - 29) < 2  # drawn radius 29
        assert set(r["quality"]) == {"score", "passed", "reason"}
        assert 0.0 <= r["quality"]["score"] <= 1.0

    # The mask went through its image's geometry, nearest-neighbour: still 0/255, lesion moved
    # to where the geometry maps it.
    rec = next(r for r in records if r["source"] == "Training_Set/Training/2.png")
    assert rec["masks"] == {"DR": "Training_Set/Masks/2_DR.png"}
    small = cv2.imread(str(dst / rec["masks"]["DR"]), cv2.IMREAD_UNCHANGED)
    assert small.shape == (SIZE, SIZE) and set(np.unique(small)) <= {0, 255}
    g = Geometry.from_dict(rec["geometry"])
    ys, xs = np.nonzero(small)
    centre = g.to_output(np.array([40.5, 24.5]))  # the lesion's centre in the frame
    assert abs(xs.mean() - centre[0]) < 1.0 and abs(ys.mean() - centre[1]) < 1.0
    assert abs(small.astype(bool).sum() - (10 * g.scale) ** 2) <= 2 * 10 * g.scale + 1
    assert after.splits["train"][1].masks == {"DR": dst / "Training_Set/Masks/2_DR.png"}


def test_unreadable_images_skipped_and_listed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_rfmid(src, "A", LABELS, n=3)
    bad = src / "Evaluation_Set" / "Validation" / "2.png"
    bad.write_bytes(b"\x89PNG broken")
    res = prepare_dataset(src, dst, PreprocessConfig(size=SIZE), workers=1)
    assert res.total == 9 and len(res.failures) == 1
    assert res.failures[0][0] == "Evaluation_Set/Validation/2.png"
    rec = [json.loads(x) for x in (dst / MANIFEST).read_text().splitlines()]
    broken = [r for r in rec if r["status"] != "ok"]
    assert [(b["source"], b["status"], b["output"]) for b in broken] == [
        ("Evaluation_Set/Validation/2.png", "unreadable", None)
    ]
    assert not (dst / "Evaluation_Set" / "Validation" / "2.png").exists()
    # The DST reader reports the missing image against its labels row.
    ds = open_dataset(dst)
    assert [(p.kind, p.row) for p in ds.problems] == [("missing_image", 3)]
    with pytest.raises(DataError, match=r"Validation/2.png: .*cannot read"):
        prepare_dataset(src, tmp_path / "dst2", PreprocessConfig(size=SIZE), workers=1, strict=True)


def test_resume_after_deletion_and_stale_temp(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_with_mask(src)
    cfg = PreprocessConfig(size=SIZE)
    prepare_dataset(src, dst, cfg, workers=1)
    first = files_under(dst)
    mtimes = {p: (dst / p).stat().st_mtime_ns for p in first}
    victim = "Test_Set/Test/3.TIF"
    (dst / victim).unlink()
    stale = dst / "Test_Set" / "Test" / ".3.TIF.k2j4h5g6.tmp"  # what a kill mid-write leaves
    stale.write_bytes(b"half an image")

    res = prepare_dataset(src, dst, cfg, workers=1)
    assert (res.processed, res.resumed) == (1, 8)
    assert not stale.exists()
    assert files_under(dst) == first  # same bytes everywhere, the victim rebuilt identically
    for p, t in mtimes.items():
        if p not in (victim, MANIFEST, SETTINGS):
            assert (dst / p).stat().st_mtime_ns == t, f"{p} was rewritten"


def test_resume_after_interruption(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_rfmid(src, "A", LABELS, n=3)
    cfg = PreprocessConfig(size=SIZE)
    real, calls = prep._process, []

    def interrupted(job):
        calls.append(job["rel"])
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prep, "_process", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, dst, cfg, workers=1)
    assert json.loads((dst / SETTINGS).read_text())["complete"] is False
    assert not (dst / MANIFEST).exists()
    done_first = calls[:3]
    mtimes = {r: (dst / r).stat().st_mtime_ns for r in done_first}

    monkeypatch.setattr(prep, "_process", real)
    res = prepare_dataset(src, dst, cfg, workers=1)
    assert (res.processed, res.resumed, res.total) == (6, 3, 9)
    assert {r: (dst / r).stat().st_mtime_ns for r in done_first} == mtimes
    assert json.loads((dst / SETTINGS).read_text())["complete"] is True
    assert len((dst / MANIFEST).read_text().splitlines()) == 9
    assert not (dst / ".prepare-journal.jsonl").exists()


def test_two_workers_same_bytes_as_one(tmp_path):
    src = tmp_path / "src"
    build_with_mask(src)
    cfg = PreprocessConfig(size=SIZE, contrast="local_mean")
    prepare_dataset(src, tmp_path / "w1", cfg, workers=1)
    prepare_dataset(src, tmp_path / "w2", cfg, workers=2)
    one, two = files_under(tmp_path / "w1"), files_under(tmp_path / "w2")
    assert len(one) == 9 + 1 + 3 + 2  # images, mask, label files, manifest + settings
    assert one == two


def test_refuses_other_settings_and_overlap(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_rfmid(src, "A", LABELS, n=2)
    prepare_dataset(src, dst, PreprocessConfig(size=SIZE), workers=1)
    with pytest.raises(UserError, match=r"other preprocess settings \(size\)"):
        prepare_dataset(src, dst, PreprocessConfig(size=SIZE + 8), workers=1)
    with pytest.raises(UserError, match="must not overlap"):
        prepare_dataset(src, src / "prepared", PreprocessConfig(size=SIZE), workers=1)


def test_odir_and_generic_csv_round_trip(tmp_path):
    build_odir(tmp_path / "odir", n=4)
    prepare_dataset(
        tmp_path / "odir", tmp_path / "odir_out", PreprocessConfig(size=SIZE), workers=1
    )
    a = open_dataset(tmp_path / "odir")
    b = open_dataset(tmp_path / "odir_out")
    assert [s.id for s in a.samples()] == [s.id for s in b.samples()]
    assert b.problems == []

    rows = []
    for i in range(4):
        fundus_png(tmp_path / "gen" / "img" / f"x{i}.jpeg", seed=i)
        rows.append([f"img/x{i}.jpeg", "train" if i < 3 else "test", i % 2])
    write_csv(tmp_path / "gen" / "labels.csv", ["image", "split", "glaucoma"], rows)
    prepare_dataset(tmp_path / "gen", tmp_path / "gen_out", PreprocessConfig(size=SIZE), workers=1)
    b = open_dataset(tmp_path / "gen_out")
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 3, "test": 1}
    assert cv2.imread(str(b.samples()[0].path)).shape == (SIZE, SIZE, 3)


def test_cli_prepare(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_rfmid(src, "B", LABELS, n=2)
    (src / "Test_Set" / "Test_Set" / "Test" / "1.png").write_bytes(b"junk")
    args = ["prepare", str(src), str(dst), "--size", str(SIZE), "--workers", "2"]
    res = runner.invoke(app, [*args, "--contrast", "clahe"])
    assert res.exit_code == 0, res.output
    assert "6 images" in res.output and "1 skipped" in res.output
    assert json.loads((dst / SETTINGS).read_text())["preprocess"]["contrast"] == "clahe"
    res = runner.invoke(app, [*args, "--contrast", "clahe", "--strict"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fundus-edge: error: ")
    assert "Test/1.png" in lines[0]
    res = runner.invoke(
        app, ["prepare", str(src), str(tmp_path / "d3"), "--size", "8", "--contrast", "sharp"]
    )
    assert res.exit_code == 2 and "contrast" in res.output
    res = runner.invoke(app, ["prepare", str(src), str(tmp_path / "d4"), "--size", "100000"])
    assert res.exit_code == 2 and "'size' must be in [1, 8192], got 100000" in res.output
    assert not (tmp_path / "d4").exists()  # refused before anything is written
    res = runner.invoke(app, ["prepare", str(tmp_path / "none"), str(dst), "--size", "8"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_synth_prepare_keeps_masks(tmp_path):
    synth = pytest.importorskip("fundus_edge.synth", reason="fundus_edge.synth not written yet")
    synth.generate_dataset(tmp_path / "s", n=6, size=128, show_progress=False)
    res = prepare_dataset(tmp_path / "s", tmp_path / "p", PreprocessConfig(size=SIZE), workers=1)
    a, b = open_dataset(tmp_path / "s"), open_dataset(tmp_path / "p")
    assert res.failures == [] and b.problems == []
    assert [(s.split, s.id, sorted(s.masks)) for s in a.samples()] == [
        (s.split, s.id, sorted(s.masks)) for s in b.samples()
    ]
    assert res.masks == sum(len(s.masks) for s in a.samples()) > 0
