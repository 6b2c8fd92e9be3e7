"""End to end: synth -> train -> export -> eval and run on the same images agree.

`fundus-edge run` on an image folder (with a corrupt file), a video and the real retina photo,
with the ONNX Runtime and PyTorch backends, gives one JSONL record per frame whose
probabilities match `fundus-edge eval` on the same images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="training needs torch (pip install 'fundus-edge[train]')")
skimage_data = pytest.importorskip(
    "skimage.data", reason="the real retina photo needs scikit-image"
)

import cv2  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fundus_edge.cli import app  # noqa: E402

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, f"{args}: {res.output}"
    return res.output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    data, run, exp = tmp / "data", tmp / "run", tmp / "export"
    _ok(["synth", str(data), "--n", "30", "--size", "128", "--seed", "1"])
    _ok([
        "train", "--config", str(REPO / "training" / "demo-cpu.yaml"), "--data", str(data),
        "--out", str(run), "--epochs", "1", "--members", "resnet18", "--image-size", "64",
        "--batch-size", "8",
    ])  # fmt: skip
    ckpt = run / "best.safetensors"
    _ok(
        [
            "export",
            "--model",
            str(ckpt),
            "--out",
            str(exp),
            "--format",
            "onnx",
            "--no-verify",
            "--no-simplify",
        ]
    )
    return tmp, data, ckpt, exp / "model.onnx"


@pytest.fixture(scope="module")
def evaluations(pipeline) -> dict[str, dict]:
    """`fundus-edge eval` on the test split with the exported graph and with the checkpoint."""
    tmp, data, ckpt, onnx_path = pipeline
    out = {}
    for which, model in (("onnx", onnx_path), ("checkpoint", ckpt)):
        ev = tmp / f"eval-{which}.json"
        _ok(
            [
                "eval",
                "--model",
                str(model),
                "--data",
                str(data),
                "--split",
                "test",
                "--json",
                str(ev),
            ]
        )
        out[which] = json.loads(ev.read_text())
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("which", ["onnx", "checkpoint"])
def test_run_matches_eval_on_the_same_images(pipeline, which):
    tmp, data, ckpt, onnx_path = pipeline
    model = onnx_path if which == "onnx" else ckpt
    ev = tmp / f"eval-{which}.json"
    _ok(["eval", "--model", str(model), "--data", str(data), "--split", "test", "--json", str(ev)])
    preds = {
        Path(p["path"]).name: p["probabilities"] for p in json.loads(ev.read_text())["predictions"]
    }
    assert preds
    # The test images plus a corrupt file and a text file in one folder.
    folder = tmp / f"frames-{which}"
    folder.mkdir()
    for p in sorted((data / "Test_Set" / "Test").glob("*.png")):
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    log = tmp / f"run-{which}.jsonl"
    out = _ok(["run", str(model), str(folder), "--headless", "--no-gate", "--jsonl", str(log)])
    assert "broken.png" in out
    records = _jsonl(log)
    assert len(records) == len(preds)  # one record per readable image, none for the bad files
    worst = 0.0
    for rec in records:
        ref = preds[Path(rec["image"]).name]
        for label, p in rec["probabilities"].items():
            worst = max(worst, abs(p - ref[label]))
    assert worst <= 1e-4, f"run vs eval max |dp| = {worst}"


def test_backends_agree_with_each_other(evaluations):
    a, b = evaluations["onnx"], evaluations["checkpoint"]
    pa = np.array([list(p["probabilities"].values()) for p in a["predictions"]])
    pb = np.array([list(p["probabilities"].values()) for p in b["predictions"]])
    assert pa.shape == pb.shape and np.abs(pa - pb).max() <= 1e-4  # ONNX Runtime == PyTorch
    assert a["macro"]["auroc"] == pytest.approx(b["macro"]["auroc"], abs=1e-3)


def test_run_on_a_video_and_the_real_retina_photo(pipeline):
    tmp, data, ckpt, onnx_path = pipeline
    retina = tmp / "retina.png"
    cv2.imwrite(str(retina), skimage_data.retina()[:, :, ::-1])
    clip = tmp / "clip.mp4"
    images = sorted((data / "Test_Set" / "Test").glob("*.png"))[:4]
    _ok(
        [
            "clip",
            *map(str, images),
            str(retina),
            "--out",
            str(clip),
            "--hold",
            "2",
            "--size",
            "320x240",
        ]
    )
    log, video = tmp / "clip.jsonl", tmp / "annotated.mp4"
    _ok(
        [
            "run",
            str(onnx_path),
            str(clip),
            "--headless",
            "--jsonl",
            str(log),
            "--save-video",
            str(video),
        ]
    )
    records = _jsonl(log)
    assert [r["frame"] for r in records] == list(range(10))  # every frame of a file, in order
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 10
    cap.release()
    for model in (onnx_path, ckpt):
        log = tmp / f"retina-{model.suffix}.jsonl"
        _ok(
            [
                "run",
                str(model),
                str(retina),
                "--headless",
                "--jsonl",
                str(log),
                "--save-dir",
                str(tmp / "ov"),
            ]
        )
        (rec,) = _jsonl(log)
        assert rec["quality"]["fov_found"] is True and rec["quality"]["passed"] is True
        assert rec["probabilities"] is not None and set(rec["probabilities"]) >= {
            "Disease_Risk",
            "DR",
        }
    assert list((tmp / "ov").iterdir())
