"""Experiment tracking: TensorBoard event files and a local MLflow store, read back with each
package's own reader; the fixed images' maps; a missing extra is exit 3 naming it; a tiny
training run with each logger, and export logging its report into the same run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_edge import tracking
from fundus_edge.errors import MissingDependencyError, UserError
from fundus_edge.tracking import numeric_metrics, open_tracker, read_record
from fundus_edge.tracking.provenance import git_commit
from fundus_edge.tracking.snapshots import pick_samples

CONFIG = {
    "name": "t",
    "optim": {"lr": 0.001, "loss": {"name": "focal"}},
    "model": {"members": ["a", "b"]},
}


def _images():
    rng = np.random.default_rng(0)
    return {"img1_DR": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "img2_MH": rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)}  # fmt: skip


def _log_everything(tracker, artifact: Path) -> dict:
    images = _images()
    tracker.log_config(CONFIG)
    tracker.log_params({"data.fingerprint": "abc123", "git.commit": "f" * 40})
    tracker.log_metrics(1, {"val_loss": 0.5, "train_loss": 0.7})
    tracker.log_metrics(2, {"val_loss": 0.25, "train_loss": 0.4})
    tracker.log_images(1, images)
    tracker.log_images(2, images)
    tracker.log_artifact(artifact)
    return images


def _artifact(tmp_path: Path) -> Path:
    f = tmp_path / "best.safetensors"
    f.write_bytes(b"weights" * 100)
    return f


# -- pure helpers -------------------------------------------------------------------------------


def test_flatten_and_numeric_metrics():
    assert tracking.flatten(CONFIG) == {
        "name": "t", "optim.lr": 0.001, "optim.loss.name": "focal", "model.members": ["a", "b"],
    }  # fmt: skip
    rec = {"epoch": 3, "val_loss": 0.5, "val_riadd": None, "best": True, "lr": 1e-3,
           "val_map": float("nan"), "time_s": 2, "note": "x", "n": np.float32(1.5)}  # fmt: skip
    assert numeric_metrics(rec) == {"val_loss": 0.5, "lr": 1e-3, "time_s": 2.0, "n": 1.5}


class _S:
    def __init__(self, sid, labels):
        self.id, self.labels = sid, np.asarray(labels, dtype=np.float32)


def test_pick_samples_covers_labels_first_and_is_deterministic():
    names = ["Disease_Risk", "DR", "MH", "ODC"]
    samples = [_S("a", [0, 0, 0, 0]), _S("b", [1, 1, 0, 0]), _S("c", [1, 1, 0, 0]),
               _S("d", [1, 0, 0, 1]), _S("e", [1, 0, 1, 0])]  # fmt: skip
    got = pick_samples(samples, names, 4, skip=["Disease_Risk"])
    # one per finding first (DR: b, MH: e, ODC: d), then the split's order with its label
    assert got == [(1, 1), (4, 2), (3, 3), (0, 0)]
    assert pick_samples(samples, names, 4, skip=["Disease_Risk"]) == got
    assert pick_samples(samples, names, 2) == [(1, 0), (2, 1)]  # no skip: b is taken
    assert len(pick_samples(samples, names, 50)) == len(samples)
    # a filler image shows its finding, not the screening label positive with it
    assert pick_samples(samples, names, 5, skip=["Disease_Risk"])[4] == (2, 1)


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None  # not a work tree

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,
                       check=True, capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    assert git_commit(tmp_path) == {"commit": sha, "dirty": False}
    (tmp_path / "f.txt").write_text("2")
    assert git_commit(tmp_path) == {"commit": sha, "dirty": True}


def test_unknown_logger_and_missing_extras(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="--logger 'wandb'"):
        tracking.require_tracker("wandb")
    tracking.require_tracker("none")
    assert isinstance(open_tracker("none", tmp_path, "x"), tracking.NullTracker)
    assert not (tmp_path / tracking.RECORD_FILE).exists()
    for module, extra in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: ImportError
        with pytest.raises(MissingDependencyError, match=rf"pip install 'fundus-edge\[{extra}\]'"):
            open_tracker(module, tmp_path, "x")
    assert not any(tmp_path.iterdir())  # nothing was made


# -- TensorBoard ------------------------------------------------------------------------------


def _tb_events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _tb_text(ea, tag: str) -> str:
    return ea.Tensors(tag)[-1].tensor_proto.string_val[0].decode()


def test_tensorboard_tracker_reads_back(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (extra: tensorboard)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    art = _artifact(tmp_path)
    with open_tracker("tensorboard", run_dir, "exp1") as tb:
        images = _log_everything(tb, art)
    rec = read_record(run_dir)
    logdir = run_dir / "tensorboard" / "exp1"
    assert rec == {"kind": "tensorboard", "logdir": str(logdir.absolute())}
    ea = _tb_events(logdir)
    assert [(s.step, s.value) for s in ea.Scalars("val_loss")] == [(1, 0.5), (2, 0.25)]
    assert [s.step for s in ea.Scalars("train_loss")] == [1, 2]
    for name, img in images.items():
        got = ea.Images(f"maps/{name}")
        assert [g.step for g in got] == [1, 2]
        png = np.frombuffer(got[-1].encoded_image_string, np.uint8)
        back = cv2.cvtColor(cv2.imdecode(png, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.array_equal(back, img)  # PNG: lossless, RGB order kept
    assert "lr: 0.001" in _tb_text(ea, "config") and "focal" in _tb_text(ea, "config")
    assert "| data.fingerprint | abc123 |" in _tb_text(ea, "params")
    assert "sha256" in _tb_text(ea, "artifacts/best.safetensors")
    assert (logdir / "artifacts" / art.name).read_bytes() == art.read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        tracking.reopen_tracker(rec).log_images(3, {"x": np.zeros((4, 4), np.float32)})


# -- MLflow -----------------------------------------------------------------------------------


def _mlflow_client(rec: dict):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=rec["tracking_uri"])


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_mlflow_tracker_reads_back_and_resumes(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (extra: mlflow)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    art = _artifact(tmp_path)
    with open_tracker("mlflow", run_dir, "exp1") as ml:
        _log_everything(ml, art)
    rec = read_record(run_dir)
    assert rec["kind"] == "mlflow"
    store = (run_dir / "mlflow").absolute()
    assert rec["tracking_uri"] == f"sqlite:///{store}/mlflow.db"
    client = _mlflow_client(rec)
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "exp1"
    p = run.data.params
    assert p["optim.lr"] == "0.001" and p["optim.loss.name"] == "focal"
    assert p["data.fingerprint"] == "abc123"
    assert run.data.tags["mlflow.source.git.commit"] == "f" * 40
    hist = client.get_metric_history(rec["run_id"], "val_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.5), (2, 0.25)]
    files = _artifact_paths(client, rec["run_id"])
    assert "config.yaml" in files and "best.safetensors" in files
    assert (store / "artifacts" / rec["run_id"] / "artifacts" / "best.safetensors").is_file()
    pngs = [f for f in files if f.endswith(".png")]
    for name in _images():  # per image and step (the run page's slider), original size kept
        assert sum(1 for f in pngs if name in f and "compressed" not in f) == 2, pngs
    cfg_text = Path(client.download_artifacts(rec["run_id"], "config.yaml", str(tmp_path)))
    assert "focal" in cfg_text.read_text()

    # --resume: the same MLflow run continues; a changed param is noted, not refused.
    with open_tracker("mlflow", run_dir, "exp1", resume=True) as ml:
        ml.log_config({**CONFIG, "optim": {"lr": 0.01, "loss": {"name": "focal"}}})
        ml.log_metrics(3, {"val_loss": 0.1})
    assert read_record(run_dir)["run_id"] == rec["run_id"]
    run = client.get_run(rec["run_id"])
    assert run.data.params["optim.lr"] == "0.001" and run.data.tags["resumed.optim.lr"] == "0.01"
    assert len(client.get_metric_history(rec["run_id"], "val_loss")) == 3
    # without --resume: a new run
    open_tracker("mlflow", run_dir, "exp1").close(ok=False)
    rec2 = read_record(run_dir)
    assert rec2["run_id"] != rec["run_id"]
    assert client.get_run(rec2["run_id"]).info.status == "FAILED"


def test_a_record_naming_a_lost_run_is_a_user_error(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (extra: mlflow)")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rec = {"kind": "mlflow", "tracking_uri": uri, "run_id": "0" * 32}
    with pytest.raises(UserError, match="is not in"):
        tracking.reopen_tracker(rec)
    (tmp_path / tracking.RECORD_FILE).write_text("{not json")
    with pytest.raises(UserError, match=tracking.RECORD_FILE):
        read_record(tmp_path)


# -- the fixed images' maps -------------------------------------------------------------------


def test_snapshots_render_each_images_own_label_map_over_it():
    torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
    from fundus_edge.tracking.snapshots import MapSnapshots

    class TwoCorners(torch.nn.Module):
        """cams (N, M=2, C=2, 4, 4): label 0 peaks top-left, label 1 bottom-right."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            cams = torch.zeros(x.shape[0], 2, 2, 4, 4)
            cams[:, :, 0, 0, 0] = 5.0
            cams[:, :, 1, 3, 3] = 0.01  # another scale: peak scaling makes it as strong
            return {"cams": cams * self.w}

    grey = np.full((2, 32, 32, 3), 128, np.uint8)
    snaps = MapSnapshots(["a_L0", "b_L1"], grey, [0, 1], (0.5,) * 3, (0.25,) * 3)
    model = TwoCorners().train()
    out = snaps.render(model)
    assert model.training  # mode restored
    assert list(out) == ["a_L0", "b_L1"]
    for name, (hot, cold) in {"a_L0": ((0, 0), (31, 31)), "b_L1": ((31, 31), (0, 0))}.items():
        img = out[name]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert np.abs(img[hot].astype(int) - 128).max() > 40, name  # the map's peak is drawn
        assert np.array_equal(img[cold], [128, 128, 128]), name  # no evidence: image unchanged
    assert MapSnapshots.pick([], ["L0"], _Pre(), (0.5,) * 3, (0.25,) * 3).render(model) == {}


class _Pre:
    size = 32


def test_export_logger_refusals_come_before_any_work(tmp_path):
    from typer.testing import CliRunner

    import fundus_edge.cli.cmd_export  # noqa: F401  (registers export)
    from fundus_edge.cli.app import app

    run = tmp_path / "run"
    run.mkdir()
    ck = run / "best.safetensors"
    ck.write_bytes(b"not read")
    out = tmp_path / "out"

    def export(*args):
        return CliRunner().invoke(app, ["export", "--model", str(ck), "--out", str(out), *args])

    res = export("--logger", "wandb")
    assert res.exit_code == 2 and "--logger 'wandb'" in res.output
    if importlib.util.find_spec("tensorboard") is not None:
        res = export("--logger", "tensorboard")
        assert res.exit_code == 2 and f"{run} has no tracking.json" in res.output, res.output
        (run / "tracking.json").write_text(json.dumps({"kind": "mlflow", "run_id": "x"}))
        res = export("--logger", "tensorboard")
        assert res.exit_code == 2 and "tracks the run with mlflow" in res.output, res.output
    res = export("--logger", "tensorboard", "--thresholds", str(ck), "--reason", "x")
    assert res.exit_code == 2 and "drop it to re-stamp" in res.output
    assert not out.exists()


# -- a tiny training run with each logger ------------------------------------------------------

# Small members at 48 px, one epoch: seconds on two CPU cores.
TINY = [
    "--members", "resnet18", "--member-head", "gap", "--weights", "none", "--image-size", "48",
    "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "1", "--seed", "3",
    "--set", "enhance.warmup_epochs=0",
]  # fmt: skip


def _train(data, out, *args):
    from typer.testing import CliRunner

    import fundus_edge.cli.cmd_train  # noqa: F401  (registers train)
    from fundus_edge.cli.app import app

    return CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), *TINY, *args])


@pytest.mark.parametrize("kind", ["tensorboard", "mlflow"])
def test_train_logs_config_metrics_maps_and_checkpoint(kind, tiny_synth, tmp_path):
    pytest.importorskip("torch", reason="torch is not installed (extra: train)")
    pytest.importorskip(kind, reason=f"{kind} is not installed (extra: {kind})")
    out = tmp_path / "run"
    res = _train(tiny_synth, out, "--logger", kind, "--logger-images", "3")
    assert res.exit_code == 0, res.output
    rec = read_record(out)
    assert rec["kind"] == kind
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    sha = git_commit()
    if kind == "tensorboard":
        logdir = Path(rec["logdir"])
        assert logdir == (out / "tensorboard" / "run").absolute()
        ea = _tb_events(logdir)
        assert ea.Scalars("val_loss")[0].step == 1
        assert ea.Scalars("val_loss")[0].value == pytest.approx(metrics["val_loss"])
        maps = [t for t in ea.Tags()["images"] if t.startswith("maps/")]
        assert len(maps) == 3 and ea.Images(maps[0])[0].width == 48
        assert "resnet18" in _tb_text(ea, "config")
        params = _tb_text(ea, "params")
        assert "| data.fingerprint |" in params and "| data.val_images |" in params
        assert f"| git.commit | {sha['commit'] if sha else 'none'} |" in params
        arts = {p.name for p in (logdir / "artifacts").iterdir()}
        assert {"best.safetensors", "metrics.csv", "training_curves.png"} <= arts
        return
    client = _mlflow_client(rec)
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.members"] == "['resnet18']"
    assert len(run.data.params["data.fingerprint"]) == 16
    (m,) = client.get_metric_history(rec["run_id"], "val_loss")
    assert m.step == 1 and m.value == pytest.approx(metrics["val_loss"])
    files = _artifact_paths(client, rec["run_id"])
    assert {"best.safetensors", "metrics.csv", "training_curves.png", "config.yaml"} <= set(files)
    maps = [f for f in files if f.startswith("images/maps") and f.endswith(".png")]
    assert len([f for f in maps if "compressed" not in f]) == 3, maps

    # --resume continues the same MLflow run
    res = _train(tiny_synth, out, "--logger", kind, "--resume", "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert read_record(out)["run_id"] == rec["run_id"]
    hist = client.get_metric_history(rec["run_id"], "val_loss")
    assert sorted(m.step for m in hist) == [1, 2]
    run = client.get_run(rec["run_id"])
    assert run.data.params["epochs"] == "1" and run.data.tags["resumed.epochs"] == "2"

    # export --logger: the report joins the same run
    exp = tmp_path / "export"
    from typer.testing import CliRunner

    import fundus_edge.cli.cmd_export
    from fundus_edge.cli.app import app

    args = ["export", "--model", str(out / "best.safetensors"), "--out", str(exp),
            "--format", "onnx", "--no-verify", "--no-simplify", "--logger", "mlflow"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "export_report.json" in _artifact_paths(client, rec["run_id"])
    assert client.get_run(rec["run_id"]).info.status == "FINISHED"

    # distill takes the same options: a student of this run, tracked with TensorBoard
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (extra: tensorboard)")
    import fundus_edge.cli.cmd_distill  # noqa: F401

    student = tmp_path / "student"
    args = ["distill", "--teacher", str(out / "best.safetensors"), "--data", str(tiny_synth),
            "--out", str(student), "--student", "resnet18", "--image-size", "48", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--device", "cpu", "--seed", "1",
            "--one-pass", "--logger", "tensorboard", "--logger-images", "2"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ea = _tb_events(Path(read_record(student)["logdir"]))
    assert ea.Scalars("val_loss")[0].step == 1
    assert len([t for t in ea.Tags()["images"] if t.startswith("maps/")]) == 2
    assert "best.safetensors" in {p.name for p in (student / "tensorboard").rglob("*")}


def test_train_with_a_missing_logger_package_is_exit_3_before_any_work(
    monkeypatch, tiny_synth, tmp_path
):
    pytest.importorskip("torch", reason="torch is not installed (extra: train)")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "run"
    res = _train(tiny_synth, out, "--logger", "mlflow")
    assert res.exit_code == 3, res.output
    assert "fundus-edge train needs 'mlflow'" in res.output
    assert "pip install 'fundus-edge[mlflow]'" in res.output
    assert not out.exists()
