"""``train --ablation --logger``: every variant its own tracker run under one log root, read
back with each package's own reader; the table as a run of its own; ``--overwrite`` leaves no
old events beside new ones; a failing variant's run closes as failed and ``--resume`` continues
it, finished variants not logged again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed (extra: train)")
pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")
pytest.importorskip("safetensors", reason="safetensors is not installed (extra: train)")

import fundus_edge.ablation as ablation
from fundus_edge.ablation import AblationTracking, run_ablation
from fundus_edge.errors import UserError
from fundus_edge.tracking import read_record

# resnet18 at 48 px, one epoch, no pretrained weights: a few seconds per variant on two cores.
TINY = [
    "--members", "resnet18", "--member-head", "gap", "--weights", "none", "--image-size", "48",
    "--batch-size", "8", "--workers", "0", "--device", "cpu", "--epochs", "1", "--seed", "3",
    "--set", "enhance.op=none", "--set", "optim.ema=0.0",
]  # fmt: skip
TINY_OPTS = {
    "model.members": ["resnet18"], "model.member_head": "gap", "model.weights": "none",
    "model.image_size": 48, "data.batch_size": 8, "data.num_workers": 0, "device": "cpu",
    "epochs": 1, "seed": 3, "enhance.op": "none", "optim.ema": 0.0,
}  # fmt: skip


def _spec(tmp_path: Path, body: str) -> Path:
    spec = tmp_path / "abl.yaml"
    spec.write_text(body)
    return spec


def _ablate(data: Path, spec: Path, out: Path, *args: str):
    from typer.testing import CliRunner

    import fundus_edge.cli.cmd_train  # noqa: F401  (registers train)
    from fundus_edge.cli.app import app

    argv = ["train", "--ablation", str(spec), "--data", str(data), "--out", str(out), *TINY]
    return CliRunner().invoke(app, [*argv, *args])


def _tb_events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tensorboard_a_run_per_variant_under_one_root_and_the_table(tiny_synth, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (extra: tensorboard)")
    spec = _spec(tmp_path, "variants:\n  a: {}\n  b: {optim.lr: 0.001}\n")
    out = tmp_path / "abl"
    res = _ablate(tiny_synth, spec, out, "--logger", "tensorboard", "--logger-images", "2")
    assert res.exit_code == 0, res.output
    root = out / "tensorboard"
    assert f"a run per variant and the table's run 'ablation' under {root}" in res.output
    assert sorted(p.name for p in root.iterdir()) == ["a", "ablation", "b"]
    table = json.loads((out / "ablation.json").read_text())
    for name in ("a", "b"):
        rec = read_record(out / name)  # each variant's run directory names its own run
        assert rec == {"kind": "tensorboard", "logdir": str((root / name).absolute())}
        ea = _tb_events(root / name)
        metrics = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        assert [s.step for s in ea.Scalars("val_loss")] == [1]
        assert ea.Scalars("val_loss")[0].value == pytest.approx(metrics["val_loss"])
        assert len([t for t in ea.Tags()["images"] if t.startswith("maps/")]) == 2
        config = ea.Tensors("config")[-1].tensor_proto.string_val[0].decode()
        assert f"name: {name}" in config
        assert "best.safetensors" in {p.name for p in (root / name / "artifacts").iterdir()}
    assert not (out / "a" / "tensorboard").exists()  # not in the variant's own run directory
    # the table: one scalar per column and variant, the files as artifacts
    ea = _tb_events(root / "ablation")
    rows = {r["variant"]: r for r in table["rows"]}
    for name in ("a", "b"):
        (s,) = ea.Scalars(f"params_m/{name}")
        assert s.step == 1 and s.value == pytest.approx(rows[name]["params_m"])
    assert {p.name for p in (root / "ablation" / "artifacts").iterdir()} >= {
        "ablation.md", "ablation.json",
    }  # fmt: skip
    assert read_record(out)["logdir"] == str((root / "ablation").absolute())

    # --overwrite: the old event folders go with the old runs; no old events beside new ones
    res = _ablate(tiny_synth, spec, out, "--logger", "tensorboard", "--overwrite")
    assert res.exit_code == 0, res.output
    for name in ("a", "b", "ablation"):
        assert len(list((root / name).glob("events.out.tfevents.*"))) == 1, name
        assert (
            len(_tb_events(root / name).Scalars("params_m/a" if name == "ablation" else "val_loss"))
            == 1
        )


def test_variant_names_that_would_clash_with_the_log_roots_are_refused(tmp_path):
    for name in ("tensorboard", "mlflow", "ablation"):
        spec = _spec(tmp_path, f"variants:\n  {name}: {{}}\n")
        with pytest.raises(UserError, match=rf"variants: '{name}': not a plain name"):
            run_ablation(spec, None, {}, [], tmp_path / "out")


def _mlflow_runs(store: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fundus-edge")
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_mlflow_failed_variant_then_resume_same_runs_one_store(tiny_synth, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (extra: mlflow)")
    spec = _spec(tmp_path, "variants:\n  a: {}\n  b: {epochs: 2}\n")
    out = tmp_path / "abl"
    store = tmp_path / "store"  # an explicit --logger-dir wins over OUT/mlflow
    tracking = AblationTracking("mlflow", store, images=0)
    opts = {**TINY_OPTS, "data.root": str(tiny_synth)}
    real_train = ablation.train

    class _Boom:  # fails b after its first epoch (its state is saved first)
        def on_epoch_end(self, epoch, record, model):
            raise RuntimeError("boom")

    def failing(cfg, **kw):
        if cfg.name == "b":
            kw["callbacks"] = [*kw["callbacks"], _Boom()]
        return real_train(cfg, **kw)

    monkeypatch.setattr(ablation, "train", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run_ablation(spec, None, opts, [], out, tracking=tracking)
    client, runs = _mlflow_runs(store)
    assert set(runs) == {"a", "b"} and not (out / "mlflow").exists()
    assert runs["a"].info.status == "FINISHED" and runs["b"].info.status == "FAILED"
    assert read_record(out / "b")["run_id"] == runs["b"].info.run_id

    # --resume: a is finished (not logged again), b continues its own run, the table is a run
    calls = []

    def counting(cfg, **kw):
        calls.append(cfg.name)
        return real_train(cfg, **kw)

    monkeypatch.setattr(ablation, "train", counting)
    res = run_ablation(spec, None, opts, [], out, resume=True, tracking=tracking)
    assert calls == ["b"]
    client, again = _mlflow_runs(store)
    assert set(again) == {"a", "b", "ablation"}  # no new run for a or b
    assert again["b"].info.run_id == runs["b"].info.run_id
    assert again["b"].info.status == "FINISHED"
    hist = client.get_metric_history(runs["b"].info.run_id, "val_loss")
    assert sorted(m.step for m in hist) == [1, 2]
    assert len(client.get_metric_history(runs["a"].info.run_id, "val_loss")) == 1
    table = again["ablation"]
    rows = {r["variant"]: r for r in res["rows"]}
    assert table.data.metrics["params_m/b"] == pytest.approx(rows["b"]["params_m"])
    assert table.data.params["variants"] == "a,b" and table.data.params["split"] == res["split"]
    arts = {a.path for a in client.list_artifacts(table.info.run_id)}
    assert {"ablation.md", "ablation.json"} <= arts
