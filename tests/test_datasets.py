"""Dataset readers: every RFMiD layout, ODIR-5K, generic CSV, and the problems they report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import fundus_edge.cli.cmd_data  # noqa: F401  (registers dataset/prepare on app)
from fundus_edge.cli.app import app
from fundus_edge.data import (
    ODIR_LABELS,
    RFMID_LABELS_30,
    RFMID_LABELS_46,
    open_dataset,
)
from fundus_edge.errors import DataError, UserError

runner = CliRunner()

SPLIT_DIRS = {
    # layout -> split -> (csv path, image folder)
    "A": {
        "train": ("Training_Set/RFMiD_Training_Labels.csv", "Training_Set/Training"),
        "val": ("Evaluation_Set/RFMiD_Validation_Labels.csv", "Evaluation_Set/Validation"),
        "test": ("Test_Set/RFMiD_Testing_Labels.csv", "Test_Set/Test"),
    },
    "B": {
        "train": ("Training_Set/RFMiD_Training_Labels.csv", "Training_Set/Training_Set/Training"),
        "val": (
            "Evaluation_Set/Evaluation_Set/RFMiD_Validation_Labels.csv",
            "Evaluation_Set/Evaluation_Set/Validation",
        ),
        "test": ("Test_Set/Test_Set/RFMiD_Testing_Labels.csv", "Test_Set/Test_Set/Test"),
    },
    "C": {
        "train": (
            "2. Groundtruths/a. RFMiD_Training_Labels.csv",
            "1. Original Images/a. Training Set",
        ),
        "val": (
            "2. Groundtruths/b. RFMiD_Validation_Labels.csv",
            "1. Original Images/b. Validation Set",
        ),
        "test": (
            "2. Groundtruths/c. RFMiD_Testing_Labels.csv",
            "1. Original Images/c. Testing Set",
        ),
    },
}


def fundus_png(path: Path, seed: int = 0, size: int = 64) -> None:
    """A tiny fundus-like picture: a coloured disc on black, encoded by the path's extension."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    colour = tuple(int(c) for c in rng.integers(60, 220, 3))
    cv2.circle(img, (size // 2, size // 2), size // 2 - 3, colour, -1)
    ext = path.suffix.lower()
    ok, buf = cv2.imencode(".jpg" if ext == ".jpeg" else ext, img)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def build_rfmid(
    root: Path,
    layout: str = "A",
    labels: tuple[str, ...] = tuple(RFMID_LABELS_46),
    n: int = 4,
    exts: dict[str, str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Write an RFMiD copy; IDs restart at 1 per split (as in RFMiD). Returns split -> ID -> labels."""
    exts = exts or {"train": ".png", "val": ".png", "test": ".png"}
    rng = np.random.default_rng(len(labels) + ord(layout))
    truth: dict[str, dict[str, np.ndarray]] = {}
    for k, (split, (csv_rel, img_rel)) in enumerate(SPLIT_DIRS[layout].items()):
        rows, truth[split] = [], {}
        for i in range(1, n + 1):
            y = rng.integers(0, 2, len(labels))
            rows.append([i, *y.tolist()])
            truth[split][str(i)] = y.astype(np.float32)
            fundus_png(root / img_rel / f"{i}{exts[split]}", seed=100 * k + i)
        write_csv(root / csv_rel, ["ID", *labels], rows)
    return truth


@pytest.mark.parametrize("layout", ["A", "B", "C"])
@pytest.mark.parametrize("labels", [RFMID_LABELS_46, RFMID_LABELS_30], ids=["46col", "30col"])
def test_rfmid_layouts(tmp_path, layout, labels):
    truth = build_rfmid(tmp_path, layout, tuple(labels), n=4)
    ds = open_dataset(tmp_path)
    assert ds.format == "rfmid"
    assert ds.label_names == list(labels)
    assert ds.label_names[0] == "Disease_Risk" == ds.screening_label
    assert ("OTHER" in ds.label_names) == (len(labels) == 29)
    assert ds.problems == []
    assert sorted(ds.splits) == ["test", "train", "val"]
    for split, samples in ds.splits.items():
        assert {s.id for s in samples} == set(truth[split])
        folder = SPLIT_DIRS[layout][split][1]
        for s in samples:
            # IDs repeat across splits: each must come from its own split's folder.
            assert s.path == tmp_path / folder / f"{s.id}.png"
            np.testing.assert_array_equal(s.labels, truth[split][s.id])
            assert s.labels.dtype == np.float32 and s.labels.shape == (len(labels),)
            assert s.split == split


def test_rfmid_mixed_case_extensions(tmp_path):
    exts = {"train": ".PNG", "val": ".jpg", "test": ".TIF"}
    build_rfmid(tmp_path, "A", n=3, exts=exts)
    ds = open_dataset(tmp_path, check_images=True)
    assert ds.problems == []
    for split, ext in exts.items():
        assert [s.path.suffix for s in ds.splits[split]] == [ext] * 3


def test_rfmid_disease_risk_moved_first(tmp_path):
    header = ["ID", "DR", "Disease_Risk", "MH"]
    write_csv(tmp_path / "RFMiD_Training_Labels.csv", header, [[1, 1, 1, 0], [2, 0, 0, 1]])
    for i in (1, 2):
        fundus_png(tmp_path / "Training" / f"{i}.png")
    ds = open_dataset(tmp_path)
    assert ds.label_names == ["Disease_Risk", "DR", "MH"]
    labels = {s.id: s.labels.tolist() for s in ds.splits["train"]}
    assert labels == {"1": [1, 1, 0], "2": [0, 0, 1]}


def test_rfmid_masks_and_meta(tmp_path):
    labels = ["Disease_Risk", "DR", "MH"]
    split_dir = tmp_path / "Training_Set"
    write_csv(
        split_dir / "RFMiD_Training_Labels.csv", ["ID", *labels], [[1, 1, 1, 0], [2, 0, 0, 0]]
    )
    for i in (1, 2):
        fundus_png(split_dir / "Training" / f"{i}.png")
    fundus_png(split_dir / "Masks" / "1_DR.png")
    (split_dir / "Meta").mkdir()
    (split_dir / "Meta" / "1.json").write_text(json.dumps({"seed": 7, "labels": ["DR"]}))
    ds = open_dataset(tmp_path)
    assert ds.problems == []  # mask files are not orphan images
    by_id = {s.id: s for s in ds.splits["train"]}
    assert by_id["1"].masks == {"DR": split_dir / "Masks" / "1_DR.png"}
    assert by_id["1"].meta == {"seed": 7, "labels": ["DR"]}
    assert by_id["2"].masks == {} and by_id["2"].meta == {}


# --- problems -------------------------------------------------------------------------------


def corrupt_rfmid(root: Path) -> Path:
    """Layout A, train split corrupted; returns the training CSV."""
    labels = ["Disease_Risk", "DR", "MH"]
    csv_path = root / "Training_Set" / "RFMiD_Training_Labels.csv"
    rows = [
        [1, 1, 1, 0],  # line 2: fine
        [2, 1, 2, 0],  # line 3: DR = 2
        [3, 0, 0, "x"],  # line 4: MH = 'x'
        [1, 0, 0, 0],  # line 5: duplicate ID 1
        [4, 1, 0, 1],  # line 6: no image
        [5, 1, 1, 1],  # line 7: unreadable image
    ]
    write_csv(csv_path, ["ID", *labels], rows)
    for i in (1, 2, 3, 6):  # 6 has no row: an orphan
        fundus_png(root / "Training_Set" / "Training" / f"{i}.png", seed=i)
    (root / "Training_Set" / "Training" / "5.png").write_bytes(b"not a png")
    return csv_path


def test_problems_have_file_row_column(tmp_path):
    csv_path = corrupt_rfmid(tmp_path)
    ds = open_dataset(tmp_path, check_images=True)
    got = {(p.kind, Path(p.file).name, p.row, p.column) for p in ds.problems}
    img = "Training_Set/Training"
    assert got == {
        ("bad_value", csv_path.name, 3, "DR"),
        ("bad_value", csv_path.name, 4, "MH"),
        ("duplicate_id", csv_path.name, 5, "ID"),
        ("missing_image", csv_path.name, 6, "ID"),
        ("unreadable_image", "5.png", None, None),
        ("orphan_image", "6.png", None, None),
    }
    assert len(ds.problems) == 6
    unreadable = next(p for p in ds.problems if p.kind == "unreadable_image")
    assert unreadable.file == str(tmp_path / img / "5.png")
    assert "line 7" in unreadable.message
    # Only the good sample is kept; nothing else vanished without a problem.
    assert [s.id for s in ds.splits["train"]] == ["1"]
    assert ds.splits["train"][0].labels.tolist() == [1, 1, 0]
    # Without check_images the unreadable file is not opened.
    ds2 = open_dataset(tmp_path)
    assert sorted(s.id for s in ds2.splits["train"]) == ["1", "5"]


def test_strict_raises_first_problem_one_line(tmp_path):
    csv_path = corrupt_rfmid(tmp_path)
    with pytest.raises(DataError) as err:
        open_dataset(tmp_path, strict=True)
    msg = str(err.value)
    assert msg == f"{csv_path}:3 column 'DR': value '2' is not 0 or 1"
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("row", "kind", "column"),
    [
        ([1, 1, "x", 0], "bad_value", "DR"),
        ([1, 1, "", 0], "bad_value", "DR"),
        ([1, 1, 0], "bad_row", None),
    ],
)
def test_single_bad_row(tmp_path, row, kind, column):
    csv_path = tmp_path / "RFMiD_Training_Labels.csv"
    write_csv(csv_path, ["ID", "Disease_Risk", "DR", "MH"], [[2, 0, 0, 0], row])
    fundus_png(tmp_path / "Training" / "1.png")
    fundus_png(tmp_path / "Training" / "2.png")
    ds = open_dataset(tmp_path)
    assert [(p.kind, p.row, p.column) for p in ds.problems] == [(kind, 3, column)]
    assert [s.id for s in ds.splits["train"]] == ["2"]
    with pytest.raises(DataError, match=r"RFMiD_Training_Labels.csv:3"):
        open_dataset(tmp_path, strict=True)


def test_missing_root_and_no_labels(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    fundus_png(tmp_path / "x.png")
    with pytest.raises(UserError, match="no labels file found"):
        open_dataset(tmp_path)
    with pytest.raises(UserError, match="unknown dataset format"):
        open_dataset(tmp_path, format="kaggle")


def test_label_columns_must_agree(tmp_path):
    write_csv(
        tmp_path / "a" / "RFMiD_Training_Labels.csv", ["ID", "Disease_Risk", "DR"], [[1, 0, 0]]
    )
    write_csv(
        tmp_path / "b" / "RFMiD_Validation_Labels.csv", ["ID", "Disease_Risk", "MH"], [[1, 0, 0]]
    )
    with pytest.raises(DataError, match=r"RFMiD_Validation_Labels.csv:1: label columns differ"):
        open_dataset(tmp_path)


# --- ODIR -----------------------------------------------------------------------------------

ODIR_HEADER = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    *ODIR_LABELS,
]


def build_odir(root: Path, n: int = 20) -> dict[str, list[float]]:
    rows, truth = [], {}
    for pid in range(n):
        y = [int((pid >> k) & 1) for k in range(8)]
        rows.append(
            [
                pid,
                40 + pid,
                "Female" if pid % 2 else "Male",
                f"{pid}_left.jpg",
                f"{pid}_right.jpg",
                "normal fundus",
                "moderate non proliferative retinopathy",
                *y,
            ]
        )
        truth[str(pid)] = [float(v) for v in y]
        for eye in ("left", "right"):
            fundus_png(root / "ODIR-5K" / "Training Images" / f"{pid}_{eye}.jpg", seed=pid)
        # The test images share names with nothing in the sheet but sit in another folder.
        fundus_png(root / "ODIR-5K" / "Testing Images" / f"{1000 + pid}_left.jpg", seed=pid)
    write_csv(root / "ODIR-5K" / "data.csv", ODIR_HEADER, rows)
    return truth


def test_odir_per_patient_to_per_image(tmp_path):
    truth = build_odir(tmp_path, n=20)
    ds = open_dataset(tmp_path, val_fraction=0.25)
    assert ds.format == "odir"
    assert ds.label_names == list(ODIR_LABELS)
    assert ds.problems == []
    assert sorted(ds.splits) == ["train", "val"]
    samples = ds.samples()
    assert len(samples) == 40
    for s in samples:
        pid, eye = s.id.rsplit("_", 1)
        assert s.path.name == f"{pid}_{eye}.jpg" and s.path.parent.name == "Training Images"
        assert s.labels.tolist() == truth[pid]
        assert s.meta["patient_id"] == pid and s.meta["eye"] == eye
    val_patients = {s.meta["patient_id"] for s in ds.splits["val"]}
    train_patients = {s.meta["patient_id"] for s in ds.splits["train"]}
    assert len(val_patients) == 5 and not (val_patients & train_patients)
    # Deterministic, and the seed moves patients.
    again = open_dataset(tmp_path, val_fraction=0.25)
    assert {s.meta["patient_id"] for s in again.splits["val"]} == val_patients
    other = open_dataset(tmp_path, val_fraction=0.25, seed=1)
    assert {s.meta["patient_id"] for s in other.splits["val"]} != val_patients


def test_odir_problems_and_xlsx(tmp_path):
    build_odir(tmp_path, n=4)
    sheet = tmp_path / "ODIR-5K" / "data.csv"
    lines = sheet.read_text().splitlines()
    lines[2] = lines[2].replace("1_right.jpg", "missing_right.jpg")  # patient 1, line 3
    sheet.write_text("\n".join(lines) + "\n")
    ds = open_dataset(sheet, format="odir", val_fraction=0.0)
    assert [(p.kind, p.row, p.column) for p in ds.problems] == [
        ("missing_image", 3, "Right-Fundus"),
        ("orphan_image", None, None),  # 1_right.jpg has no row now
    ]
    assert "1_left" in {s.id for s in ds.splits["train"]}
    assert "1_right" not in {s.id for s in ds.splits["train"]}
    xlsx = tmp_path / "x" / "data.xlsx"
    xlsx.parent.mkdir()
    xlsx.write_bytes(b"PK")
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="export the sheet to CSV"):
            open_dataset(xlsx)


# --- generic CSV ----------------------------------------------------------------------------


def test_generic_csv(tmp_path):
    rows = []
    for i in range(6):
        fundus_png(tmp_path / "imgs" / f"im{i}.png", seed=i)
        split = ["train", "Validation", "test"][i % 3]
        rows.append([f"imgs/im{i}.png", split, i % 2, int(i > 2), f"p{i}"])
    write_csv(tmp_path / "labels.csv", ["filename", "split", "glaucoma", "dr", "patient_id"], rows)
    ds = open_dataset(tmp_path)
    assert ds.format == "csv" and ds.problems == []
    assert ds.label_names == ["glaucoma", "dr"] and ds.screening_label is None
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 2, "val": 2, "test": 2}
    s = next(s for s in ds.samples() if s.id == "imgs/im4")
    assert s.split == "val" and s.labels.tolist() == [0, 1] and s.meta == {"patient_id": "p4"}
    # Same file given explicitly, with a renamed path column.
    (tmp_path / "labels.csv").write_text(
        (tmp_path / "labels.csv").read_text().replace("filename", "picture")
    )
    with pytest.raises(DataError, match=r"labels.csv:1: no image-path column"):
        open_dataset(tmp_path / "labels.csv", format="csv")
    ds2 = open_dataset(tmp_path / "labels.csv", format="csv", image_column="picture")
    assert len(ds2.samples()) == 6


def test_generic_csv_without_split_and_problems(tmp_path):
    rows = [[f"a{i}.png", 0, i % 2] for i in range(10)]
    rows.append(["a0.png", 1, 1])  # line 12: duplicate
    rows.append(["nothere.png", 1, 1])  # line 13: missing
    for i in range(10):
        fundus_png(tmp_path / f"a{i}.png", seed=i)
    write_csv(tmp_path / "set.csv", ["path", "Disease_Risk", "X"], rows)
    ds = open_dataset(tmp_path, val_fraction=0.2)
    assert ds.screening_label == "Disease_Risk"
    assert [(p.kind, p.row, p.column) for p in ds.problems] == [
        ("duplicate_id", 12, "path"),
        ("missing_image", 13, "path"),
    ]
    assert len(ds.splits["val"]) == 2 and len(ds.splits["train"]) == 8
    summary = ds.summary()
    assert summary["splits"]["train"]["images"] == 8
    pos = sum(s.labels[1] for s in ds.splits["train"])
    assert summary["splits"]["train"]["prevalence"]["X"] == {
        "count": int(pos),
        "percent": round(100 * pos / 8, 2),
    }


# --- CLI ------------------------------------------------------------------------------------


def test_cli_dataset_report_and_json(tmp_path):
    build_rfmid(tmp_path / "d", "C", tuple(RFMID_LABELS_30), n=3)
    out = tmp_path / "r" / "report.json"
    res = runner.invoke(app, ["dataset", str(tmp_path / "d"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "rfmid" in res.output and "Disease_Risk" in res.output and "OTHER" in res.output
    report = json.loads(out.read_text())
    assert report["format"] == "rfmid"
    assert {k: v["images"] for k, v in report["splits"].items()} == {
        "train": 3,
        "val": 3,
        "test": 3,
    }
    assert report["problems"] == []


def test_cli_dataset_problems_and_strict(tmp_path):
    csv_path = corrupt_rfmid(tmp_path)
    res = runner.invoke(app, ["dataset", str(tmp_path), "--check-images"])
    assert res.exit_code == 0, res.output
    assert "6 problem" in res.output and "not 0 or 1" in res.output
    res = runner.invoke(app, ["dataset", str(tmp_path), "--strict"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines == [f"fundus-edge: error: {csv_path}:3 column 'DR': value '2' is not 0 or 1"]
    res = runner.invoke(app, ["dataset", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert "does not exist" in res.output


def test_cli_dataset_subprocess(tmp_path, repo_root):
    exe = [sys.executable, "-m", "fundus_edge"]
    helped = subprocess.run([*exe, "--help"], capture_output=True, text=True, cwd=repo_root)
    if "dataset" not in helped.stdout + helped.stderr:
        pytest.skip("`dataset` is not registered in fundus_edge/cli/__init__.py yet (lead's step)")
    csv_path = corrupt_rfmid(tmp_path)
    res = subprocess.run(
        [*exe, "dataset", str(tmp_path), "--strict"],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr == f"fundus-edge: error: {csv_path}:3 column 'DR': value '2' is not 0 or 1\n"
    res = subprocess.run(
        [*exe, "dataset", str(tmp_path)], capture_output=True, text=True, cwd=repo_root, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "5 problem(s)" in res.stdout


def test_synth_round_trip(tmp_path):
    synth = pytest.importorskip("fundus_edge.synth", reason="fundus_edge.synth not written yet")
    info = synth.generate_dataset(tmp_path, n=10, size=128, show_progress=False)
    ds = open_dataset(tmp_path, check_images=True)
    assert ds.format == "rfmid" and ds.problems == []
    assert ds.label_names == info["labels"] and ds.screening_label == "Disease_Risk"
    assert {k: len(v) for k, v in ds.splits.items()} == {
        k: v["count"] for k, v in info["splits"].items()
    }
    assert ds.prevalence() == {k: v["positives"] for k, v in info["splits"].items()}
    n_masks = 0
    for s in ds.samples():
        assert s.meta["id"] in (int(s.id), s.id) and s.meta["split"] == s.split
        positive = {lab for lab, v in zip(ds.label_names, s.labels, strict=True) if v}
        assert set(s.masks) <= positive  # a mask only for a label the image has
        n_masks += len(s.masks)
    assert n_masks > 0
