"""End-to-end training on a tiny synthetic set: runs, checkpoints, eval CLI, resume, refusals,
non-finite losses, unreadable images, the ablation table, one public training step."""

from __future__ import annotations

import json
import os
import re
import socket

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")
pytest.importorskip("safetensors", reason="safetensors is not installed (extra: train)")

from typer.testing import CliRunner  # noqa: E402

import fundus_edge.cli.cmd_train  # noqa: E402,F401  (registers train / eval)
from fundus_edge.cli.app import app  # noqa: E402
from fundus_edge.config import load_config  # noqa: E402
from fundus_edge.errors import UserError  # noqa: E402

# Small members at 48 px: a few seconds per epoch on two CPU cores.
TINY = [
    "--members", "resnet18,mobilenet_v3_large", "--member-head", "gap", "--weights", "none",
    "--image-size", "48", "--batch-size", "4", "--workers", "0", "--device", "cpu",
    "--epochs", "2", "--seed", "3",
    "--set", "enhance.warmup_epochs=1", "--set", "optim.freeze_epochs=1",
    "--set", "optim.backbone_lr_mult=1.0", "--set", "optim.ema=0.9",
    "--set", "optim.loss.name=focal",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tiny_synth):
    return tiny_synth


def _invoke(args):
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    return out, res.output


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_writes_a_complete_run(reference_run):
    out, output = reference_run
    assert "2 epoch(s)" in output
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "best.safetensors",
                 "last.safetensors", "last.state.pt", "training_curves.png"):  # fmt: skip
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2]
    import csv

    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in table] == [1, 2]
    assert float(table[1]["val_loss"]) == pytest.approx(recs[1]["val_loss"])
    assert recs[1]["skipped_images"] == 0 and recs[1]["effective_batch_size"] == 4
    assert recs[1]["world_size"] == 1
    assert recs[0]["frozen"] and not recs[0]["enhance"]  # warm-up: plain, frozen backbone
    assert recs[1]["enhance"] and not recs[1]["frozen"]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in recs)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["members"] == ["resnet18", "mobilenet_v3_large"]
    assert cfg["optim"]["loss"]["name"] == "focal"
    from fundus_edge.models import read_checkpoint_meta

    meta = read_checkpoint_meta(out / "last.safetensors")
    assert meta["epoch"] == 2
    assert len(meta["thresholds"]) == len(meta["label_names"]) == 13
    assert meta["preprocess"]["size"] == 48
    assert meta["config"]["views"] == "both"
    # The summary line names the selection metric and shows its value as recorded.
    best = [r for r in recs if r["best"]][-1]
    m = re.search(r"best (val_\w+) (-?[0-9.]+) -> ", output)
    assert m is not None, output
    assert float(m[2]) == pytest.approx(best[m[1]], abs=1e-4)


def test_eval_cli_writes_json_and_pngs(reference_run, data_dir, tmp_path):
    out, _ = reference_run
    report_path = tmp_path / "eval" / "report.json"
    res = _invoke(["eval", "--model", str(out / "best.safetensors"), "--data", str(data_dir),
                   "--split", "test", "--json", str(report_path), "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rep = json.loads(report_path.read_text())
    assert rep["n"] == 5 and rep["split"] == "test"
    assert set(rep["per_label"]) >= {"Disease_Risk", "DR"}
    for key in ("auroc", "ap", "f1"):
        assert key in rep["macro"]
    assert rep["riadd"].keys() >= {"score", "screening_auroc"}
    assert 0.0 <= rep["elementwise"]["accuracy"] <= 1.0
    # Labels with one class in a 5-image split are reported as null and named in a note.
    nulls = [k for k, v in rep["per_label"].items() if v["auroc"] is None]
    assert nulls and any(nulls[0] in n for n in rep["notes"])
    for fig in ("roc", "pr", "maps"):
        png = report_path.parent / f"{fig}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    if rep["localisation"] is not None:  # synth masks for positive findings
        lo = rep["localisation"]["macro"]
        assert 0.0 <= lo["pointing_game"] <= 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_gives_the_same_weights(reference_run, data_dir, tmp_path, monkeypatch):
    ref, _ = reference_run
    out = tmp_path / "resumed"
    # First half under torchrun's environment (DDP, gloo, world size 1): the distributed path.
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *TINY, "--stop-after", "1"])
    assert res.exit_code == 0, res.output
    assert "stopped (resumable): 1 epoch(s)" in res.output
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *TINY, "--resume"])
    assert res.exit_code == 0, res.output
    a, b = _tensors(ref / "last.safetensors"), _tensors(out / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    ra = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], abs=1e-6)


def test_ctrl_c_mid_epoch_saves_state_and_resume_is_exact(
    reference_run, data_dir, tmp_path, monkeypatch
):
    import signal

    from fundus_edge import trainer

    ref, _ = reference_run
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    original = trainer.ModelEMA.update

    def update_then_ctrl_c(self, model):
        original(self, model)
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, step 1 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer.ModelEMA, "update", update_then_ctrl_c)
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *TINY])
    assert res.exit_code == 130, res.output
    state = torch.load(out / trainer.STATE_FILE, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 1)
    monkeypatch.setattr(trainer.ModelEMA, "update", original)
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *TINY, "--resume"])
    assert res.exit_code == 0, res.output
    a, b = _tensors(ref / "last.safetensors"), _tensors(out / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_refuses_to_overwrite_and_one_line_errors(reference_run, data_dir, tmp_path):
    out, _ = reference_run
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *TINY])
    assert res.exit_code == 2
    assert "--resume" in res.output and "--overwrite" in res.output
    res = _invoke(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = _invoke(["train", "--data", str(data_dir), "--out", str(tmp_path / "r2"), *TINY,
                   "--members", "resnet18,alexnet"])  # fmt: skip
    assert res.exit_code == 2 and "alexnet" in res.output and "vgg19" in res.output
    assert not (tmp_path / "r2").exists()  # a refused start leaves nothing to --overwrite
    (tmp_path / "r5").mkdir()  # a run stopped before its first save: config.yaml alone
    (tmp_path / "r5" / "config.yaml").write_text("epochs: 1\n")
    res = _invoke(["train", "--data", str(data_dir), "--out", str(tmp_path / "r5"), *TINY,
                   "--epochs", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    if not torch.cuda.is_available():
        args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r3"), *TINY]
        res = _invoke([*args, "--device", "cuda"])
        assert res.exit_code == 2 and "CUDA is not available" in res.output
    res = _invoke(["train", "--data", str(data_dir), "--out", str(tmp_path / "r4"), "--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.output


def test_failed_start_with_overwrite_keeps_the_old_run(
    reference_run, data_dir, tmp_path, monkeypatch
):
    """--overwrite deletes the old run only once data and model (weights included) are ready."""
    import shutil

    ref, _ = reference_run
    old = tmp_path / "old"
    shutil.copytree(ref, old)
    before = {p.name: _sha(p) for p in old.iterdir() if p.is_file()}
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached ImageNet weights
    args = ["train", "--data", str(data_dir), "--out", str(old), *TINY, "--overwrite"]
    res = _invoke([*args, "--weights", "imagenet"])
    assert res.exit_code == 2 and "ImageNet weights for resnet18 not found" in res.output
    res = _invoke([*args, "--set", "model.head=bogus"])
    assert res.exit_code == 2 and "model: unknown head 'bogus'" in res.output
    res = _invoke([*args, "--set", "select=val_f2"])  # was only noticed after epoch 1
    assert res.exit_code == 2 and "select: 'val_f2' is not one of auto, val_loss" in res.output
    assert {p.name: _sha(p) for p in old.iterdir() if p.is_file()} == before


def _copy_run(ref, dest):
    import shutil

    shutil.copytree(ref, dest)
    return dest, (dest / "config.yaml").read_bytes()


def test_resume_refusals_leave_the_run_as_it_was(reference_run, data_dir, tmp_path):
    """A refused --resume says why in one line and leaves config.yaml and the state as they were."""
    import shutil

    from fundus_edge import trainer

    run, config = _copy_run(reference_run[0], tmp_path / "run")
    state = (run / trainer.STATE_FILE).read_bytes()
    base = ["train", "--data", str(data_dir), "--out", str(run), "--resume", "--epochs", "3"]
    # An option that would change the model is refused, not silently ignored.
    res = _invoke([*base, "--members", "resnet18", "--image-size", "64"])
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert "--resume continues" in line and "model.members" in line and "model.image_size" in line
    # Data with other labels (a column dropped).
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    for csv_file in other.rglob("*.csv"):
        rows = csv_file.read_text().splitlines()
        csv_file.write_text("".join(",".join(r.split(",")[:-1]) + "\n" for r in rows))
    res = _invoke(["train", "--data", str(other), "--out", str(run), "--resume", "--epochs", "3"])
    assert res.exit_code == 2 and "the run trained on labels" in res.output, res.output
    # The same labels, but another training split (one label of one image changed).
    shutil.rmtree(other)
    shutil.copytree(data_dir, other)
    (train_csv,) = (other / "Training_Set").glob("*.csv")
    rows = train_csv.read_text().splitlines()
    cells = rows[1].split(",")
    cells[2] = "0" if cells[2] == "1" else "1"
    train_csv.write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    res = _invoke(["train", "--data", str(other), "--out", str(run), "--resume", "--epochs", "3"])
    assert res.exit_code == 2 and "training split of --data" in res.output, res.output
    # A damaged state file.
    (run / trainer.STATE_FILE).write_bytes(state[: len(state) // 2])
    res = _invoke(base)
    assert res.exit_code == 2 and "cannot read the run's state" in res.output, res.output
    assert (run / "config.yaml").read_bytes() == config
    (run / trainer.STATE_FILE).write_bytes(state)


def test_resume_with_a_lower_lr_rescales_the_schedule(reference_run, data_dir, tmp_path):
    a, _ = _copy_run(reference_run[0], tmp_path / "a")
    b, _ = _copy_run(reference_run[0], tmp_path / "b")
    more = ["--data", str(data_dir), *TINY, "--resume", "--epochs", "3"]
    assert _invoke(["train", "--out", str(a), *more]).exit_code == 0
    res = _invoke(["train", "--out", str(b), *more, "--lr", "1e-5"])
    assert res.exit_code == 0, res.output
    rec_a = json.loads((a / "metrics.jsonl").read_text().splitlines()[-1])
    rec_b = json.loads((b / "metrics.jsonl").read_text().splitlines()[-1])
    lr_a = yaml.safe_load((a / "config.yaml").read_text())["optim"]["lr"]
    assert yaml.safe_load((b / "config.yaml").read_text())["optim"]["lr"] == 1e-5
    assert rec_b["epoch"] == rec_a["epoch"] == 3
    assert rec_b["lr"] / rec_a["lr"] == pytest.approx(1e-5 / lr_a, rel=1e-6)


@pytest.mark.parametrize(
    "pair",
    [
        "optim.lr=-1",
        "optim.lr=.nan",
        "optim.weight_decay=-1",
        "optim.backbone_lr_mult=-1",
        "optim.min_lr_ratio=5",
        "optim.momentum=-1",
        "optim.loss.clip=5",
        "data.num_workers=-1",
        "data.augment.hflip=2",
        "data.augment.rotate=-400",
        "data.limit=0",
        "enhance.warmup_epochs=-1",
    ],
)
def test_out_of_range_values_are_refused_by_name(pair):
    key = pair.split("=")[0]
    with pytest.raises(UserError, match=rf"{re.escape(key)}: must be in [\[(]"):
        load_config(None, sets=[pair])


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("device=gpu", "device: 'gpu': expected auto, cpu, cuda or cuda:N"),
        ("model.mean=[0.5, 0.5]", "model: 'mean' and 'std' need 3 values each"),
        ("model.std=[0.2, 0, 0.2]", "model: 'mean' and 'std' need 3 values each, std > 0"),
        ("data.preprocess={bogus: 1}", "unknown key data.preprocess.bogus"),
        ("data.preprocess={margin: 2}", "data.preprocess: preprocess option 'margin' must be"),
    ],
)
def test_recipe_errors_name_the_recipe_and_key(tmp_path, pair, message):
    key, value = pair.split("=", 1)
    recipe = tmp_path / "r.yaml"
    *parents, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents))
    recipe.write_text(text + f"{'  ' * len(parents)}{leaf}: {value}\n")
    with pytest.raises(UserError, match=re.escape(f"{recipe}: {message}")):
        load_config(recipe)


def test_recipe_with_a_key_twice_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2\noptim:\n  lr: 0.1\nepochs: 3\n")
    with pytest.raises(UserError, match=r"r\.yaml:4: not valid YAML \(key 'epochs' given twice\)"):
        load_config(recipe)


def test_unwritable_outputs_are_one_line_before_any_work(reference_run, data_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = _invoke(["train", "--data", str(data_dir), "--out", str(afile), *TINY])
    assert res.exit_code == 2 and "is a file, not a run directory" in res.output
    res = _invoke(["train", "--data", str(data_dir), "--out", str(afile / "run"), *TINY])
    assert res.exit_code == 2 and "cannot write in" in res.output
    ckpt = str(reference_run[0] / "best.safetensors")
    folder = tmp_path / "folder"
    folder.mkdir()
    res = _invoke(["eval", "--model", ckpt, "--data", str(data_dir), "--json", str(folder)])
    assert res.exit_code == 2 and "is a folder; give a file name" in res.output
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.png"))
    res = _invoke(["eval", "--model", ckpt, "--data", str(data_dir), "--json", f"{afile}/r.json"])
    assert res.exit_code == 2 and "cannot write there" in res.output
    res = _invoke(["eval", "--model", ckpt, "--data", str(data_dir), "--batch-size", "0"])
    assert res.exit_code == 2 and "--batch-size 0" in res.output


def test_config_layers_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nmodel:\n  members: [resnet18]\noptim:\n  lr: 0.01\n")
    cfg = load_config(recipe, {"optim.lr": 1e-4}, sets=["data.sampler=label_aware"])
    assert cfg.epochs == 3 and cfg.model.members == ("resnet18",)
    assert cfg.optim.lr == 1e-4 and cfg.data.sampler == "label_aware"
    assert cfg.optim.loss.name == "bce"  # default kept
    recipe.write_text("optim:\n  lr_typo: 1\n")
    with pytest.raises(UserError, match=r"r\.yaml: unknown key optim\.lr_typo"):
        load_config(recipe)
    with pytest.raises(UserError, match="epochs: expected int"):
        load_config(None, {"epochs": "many"})
    with pytest.raises(UserError, match=r"enhance\.op"):
        load_config(None, {"enhance.op": "blur"})
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("demo-cpu.yaml", "rfmid-paper.yaml"):
        load_config(os.path.join(repo, "training", name))


def test_label_aware_sampler_draws_rare_labels_more():
    from fundus_edge.torchdata import epoch_indices, label_aware_weights

    labels = np.zeros((100, 2))
    labels[:5, 0] = 1  # rare
    labels[5:60, 1] = 1  # common
    w = label_aware_weights(labels)
    assert w[0] > w[10] and w.sum() == pytest.approx(1.0)
    idx = epoch_indices(100, 0, 0, "label_aware", labels)
    assert idx == epoch_indices(100, 0, 0, "label_aware", labels)  # deterministic
    assert np.mean(np.array(idx) < 5) > 0.2  # rare images ~1/3 of draws, not 5 %
    a = epoch_indices(10, 1, 0, "shuffle", rank=0, world_size=2)
    b = epoch_indices(10, 1, 0, "shuffle", rank=1, world_size=2)
    assert sorted(a + b) == list(range(10))


# One member at 32 px, 14 training images in two batches of 7: seconds per epoch.
SMALL = [
    "--members", "resnet18", "--member-head", "gap", "--weights", "none",
    "--image-size", "32", "--batch-size", "7", "--workers", "0", "--device", "cpu",
    "--seed", "1", "--enhance", "none", "--set", "optim.ema=0",
]  # fmt: skip


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_finite_loss_stops_with_one_line_and_keeps_the_best(data_dir, tmp_path, monkeypatch):
    from fundus_edge import losses

    out = tmp_path / "nan"
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *SMALL, "--epochs", "2",
                   "--stop-after", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    best = _sha(out / "best.safetensors")
    state = _sha(out / "last.state.pt")

    original = losses.build_loss

    def nan_loss(cfg, labels=None):
        inner = original(cfg, labels)

        class NanAtStep(torch.nn.Module):
            calls = 0

            def forward(self, logits, y):
                value = inner(logits, y)
                if torch.is_grad_enabled():  # training steps only, not validation
                    NanAtStep.calls += 1
                    if NanAtStep.calls == 2:  # epoch 2, step 2
                        return value * float("nan")
                return value

        return NanAtStep()

    monkeypatch.setattr(losses, "build_loss", nan_loss)
    res = _invoke(["train", "--data", str(data_dir), "--out", str(out), *SMALL, "--epochs", "2",
                   "--resume"])  # fmt: skip
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert "loss is nan at epoch 2 step 2" in line and "best.safetensors" in line, line
    assert _sha(out / "best.safetensors") == best
    assert _sha(out / "last.state.pt") == state  # nothing of the bad epoch was saved
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_unreadable_training_image_is_skipped_and_counted(data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    victim = data / "Training_Set" / "Training" / "3.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)  # corrupt after creation
    out = tmp_path / "run"
    # No cache: the image is met while the epoch runs, not when the cache is filled.
    res = _invoke(["train", "--data", str(data), "--out", str(out), *SMALL, "--epochs", "1",
                   "--set", "data.cache=false"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1 unreadable training image(s) skipped" in res.output
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_images"] == 1 and rec["val_skipped_images"] == 0
    import csv

    assert [r["skipped_images"] for r in csv.DictReader((out / "metrics.csv").open())] == ["1"]


def test_preload_records_unreadable_images(data_dir, tmp_path):
    import shutil

    from fundus_edge.data import open_dataset
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.torchdata import FundusTorchDataset, split_unreadable

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    samples = open_dataset(data).splits["train"][:4]
    samples[1].path.write_bytes(b"")
    ds = FundusTorchDataset(samples, PreprocessConfig(size=32), (0.5,) * 3, (0.25,) * 3)
    ds.preload(2)
    assert list(ds.unreadable) == [1] and "empty file" in ds.failure(1)
    batch = [ds[i] for i in range(4)]
    x = torch.stack([b[0] for b in batch])
    y = torch.stack([b[1] for b in batch])
    idx = torch.tensor([b[2] for b in batch])
    assert idx.tolist() == [0, -2, 2, 3]
    x2, y2, dropped = split_unreadable(x, y, idx)
    assert dropped == [1] and x2.shape[0] == y2.shape[0] == 3


def test_ablation_from_the_cli(data_dir, tmp_path):
    spec = tmp_path / "abl.yaml"
    spec.write_text(
        "variants:\n"
        "  solo: {model.members: [$2], enhance.op: none}\n"
        "  fusion_cam: {model.head: fusion, enhance.op: weight, enhance.warmup_epochs: 0}\n"
    )
    out = tmp_path / "abl"
    args = [a for a in SMALL if a != "resnet18"]
    i = args.index("--members")
    args[i : i + 1] = []
    res = _invoke(["train", "--ablation", str(spec), "--data", str(data_dir), "--out", str(out),
                   *args, "--members", "resnet18,mobilenet_v3_large", "--epochs", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    table = json.loads((out / "ablation.json").read_text())
    assert table["split"] == "test"
    rows = {r["variant"]: r for r in table["rows"]}
    assert rows["solo"]["members"] == "mobilenet_v3_large" and rows["solo"]["enhance"] == "none"
    assert rows["fusion_cam"]["members"] == "resnet18+mobilenet_v3_large"
    assert rows["fusion_cam"]["head"] == "fusion" and rows["fusion_cam"]["enhance"] == "weight"
    for r in rows.values():
        for key in ("accuracy", "precision", "recall", "macro_auroc", "map", "macro_f1"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0, key
        assert r["params_m"] > 0.1 and r["train_time_s"] > 0
    assert rows["fusion_cam"]["params_m"] > rows["solo"]["params_m"]
    md = (out / "ablation.md").read_text()
    assert "accuracy (element-wise)" in md and "Disease_Risk AUROC" in md
    assert md.count("\n| ") == 3  # header + 2 rows


@pytest.mark.parametrize("mode", ["plain", "kernel", "gradcam"])
def test_training_step_modes(mode):
    if mode == "gradcam":
        pytest.importorskip("pytorch_grad_cam", reason="grad-cam is not installed")
    from fundus_edge.losses import LossConfig, build_loss
    from fundus_edge.models import EnsembleConfig, build_ensemble
    from fundus_edge.trainer import training_step

    torch.manual_seed(0)
    model = build_ensemble(
        EnsembleConfig(members=("resnet18",), num_classes=3, member_head="gap", views="both")
    )
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.members[0].head.classifier[-1].weight.detach().clone()
    loss = training_step(model, x, y, build_loss(LossConfig(pos_weight="none")), opt, mode=mode)
    assert np.isfinite(loss) and loss > 0
    assert not torch.equal(before, model.members[0].head.classifier[-1].weight)
    assert model.training
    with pytest.raises(UserError, match="mode 'blur'"):
        training_step(model, x, y, build_loss(LossConfig(pos_weight="none")), mode="blur")


def test_paper_ensemble_vgg19_resnet50_trains_a_few_steps_tiny():
    """The paper's members with their native heads (VGG19's MLP), CAM-augmented steps at 32 px."""
    import torch

    from fundus_edge.losses import LossConfig, build_loss
    from fundus_edge.models import EnhanceConfig, EnsembleConfig, build_ensemble
    from fundus_edge.trainer import training_step

    torch.manual_seed(0)
    cfg = EnsembleConfig(
        members=("vgg19", "resnet50"), num_classes=3, image_size=32, member_head="native",
        enhance=EnhanceConfig(op="weight"),
    )  # fmt: skip
    ens = build_ensemble(cfg)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    opt = torch.optim.SGD(ens.parameters(), lr=1e-3)
    loss_fn = build_loss(LossConfig(name="bce", pos_weight="none"))
    before = ens.members[0].head.classifier[-1].weight.detach().clone()
    losses = [training_step(ens, x, y, loss_fn, opt, mode="kernel") for _ in range(2)]
    losses.append(training_step(ens, x, y, loss_fn, opt, mode="plain"))
    assert all(np.isfinite(v) for v in losses)
    assert not torch.equal(before, ens.members[0].head.classifier[-1].weight)


def test_step_objectives_and_unlabelled_rows():
    """Objectives add to the loss as they return it; unlabelled rows leave the supervised term."""
    from fundus_edge.losses import LossConfig, build_loss
    from fundus_edge.models import EnsembleConfig, build_ensemble
    from fundus_edge.trainer import Batch, KernelAttention, NoAttention, TrainStep

    torch.manual_seed(0)
    ens = build_ensemble(
        EnsembleConfig(members=("resnet18",), num_classes=3, member_head="gap", views="both")
    ).eval()  # no dropout draws: the same logits on every call
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]])
    loss_fn = build_loss(LossConfig(pos_weight="none"))

    class Energy:
        name = "energy"

        def __call__(self, outputs, batch):
            return 0.1 * outputs["logits"].float().pow(2).mean()

    with torch.no_grad():
        logits = ens.head_logits(x).float()
        plain = TrainStep(ens, loss_fn, NoAttention())(Batch(x, y))
        assert float(plain["loss"]) == pytest.approx(float(loss_fn(logits, y)), rel=1e-6)
        assert "logits_enhanced" not in plain and plain["terms"] == {}
        labelled = torch.tensor([True, True, False, False])
        part = TrainStep(ens, loss_fn, NoAttention(), [Energy()])(Batch(x, y, labelled=labelled))
        energy = 0.1 * float(logits.pow(2).mean())
        assert float(part["terms"]["energy"]) == pytest.approx(energy, rel=1e-5)
        want = float(loss_fn(logits[:2], y[:2])) + energy
        assert float(part["loss"]) == pytest.approx(want, rel=1e-5)
        none = TrainStep(ens, loss_fn, NoAttention())(Batch(x, y, labelled=labelled & False))
        assert float(none["loss"]) == 0.0
        two = TrainStep(ens, loss_fn, KernelAttention())(Batch(x, y))
        assert two["logits_enhanced"].shape == two["logits"].shape == (4, 1, 3)
    with pytest.raises(ValueError, match="unique"):
        TrainStep(ens, loss_fn, objectives=[Energy(), Energy()])


def test_batch_cat_marks_rows_from_elsewhere():
    from fundus_edge.trainer import Batch

    a = Batch(torch.zeros(3, 3, 8, 8), torch.ones(3, 2), index=torch.tensor([4, 0, 2]))
    b = Batch(torch.ones(2, 3, 8, 8), torch.zeros(2, 2), labelled=torch.tensor([False, False]))
    c = a.cat(b)
    assert len(c) == 5 and c.index.tolist() == [4, 0, 2, -1, -1]
    assert c.labelled.tolist() == [True, True, True, False, False]
    assert c.masks is None and torch.equal(c.x[3:], b.x)
    with pytest.raises(ValueError, match="extra keys"):
        a.cat(Batch(b.x, b.y, extra={"teacher": torch.zeros(2, 2)}))


def test_train_with_objectives_extra_rows_and_callbacks(data_dir, tmp_path):
    """The hooks distillation and experiment tracking use, through :func:`train` itself."""
    from fundus_edge.trainer import Batch, train

    cfg = load_config(None, {
        "data.root": str(data_dir), "out": str(tmp_path / "run"), "epochs": 2,
        "model.members": ["resnet18"], "model.member_head": "gap", "model.weights": "none",
        "model.image_size": 32, "data.batch_size": 7, "data.num_workers": 0, "device": "cpu",
        "seed": 1, "enhance.warmup_epochs": 1,
    })  # fmt: skip
    seen = []

    class Shrink:
        name = "shrink"

        def __call__(self, outputs, batch):
            seen.append((len(batch), batch.index.tolist(), batch.labelled.tolist(),
                         "logits_enhanced" in outputs))  # fmt: skip
            return 0.01 * outputs["logits"].float().pow(2).mean()

    class TwoMore:
        def batch(self, epoch, step):
            g = torch.Generator().manual_seed(epoch * 1000 + step)
            x = torch.randn(2, 3, 32, 32, generator=g)
            return Batch(x, torch.zeros(2, 13), labelled=torch.zeros(2, dtype=torch.bool))

    class Recorder:
        def __init__(self):
            self.epochs, self.result = [], None

        def on_epoch_end(self, epoch, record, model):
            self.epochs.append((epoch, dict(record), type(model).__name__))

        def on_train_end(self, result):
            self.result = result

    rec = Recorder()
    res = train(cfg, show_progress=False, objectives=[Shrink()], callbacks=[rec],
                extra_data=TwoMore())  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train_shrink"] > 0 for r in lines) and "train_mask_loss" not in lines[0]
    assert [e[0] for e in rec.epochs] == [1, 2] and rec.epochs[1][2] == "Ensemble"
    assert rec.epochs[1][1] == lines[1] and rec.result is res and res.epochs_done == 2
    assert {s[0] for s in seen} == {9} and len(seen) == 4  # 2 steps of 7 + 2 rows, 2 epochs
    assert all(s[1][-2:] == [-1, -1] and min(s[1][:7]) >= 0 for s in seen)
    assert all(s[2] == [True] * 7 + [False] * 2 for s in seen)
    assert [s[3] for s in seen] == [False, False, True, True]  # warm-up, then enhanced


def test_resolve_layers_name_their_own_errors_and_later_ones_win(tmp_path):
    from fundus_edge.config import TrainConfig, flatten, parse_sets, resolve

    teacher = {"model.members": ["resnet18"], "model.image_size": 64}
    recipe = {
        "model": {"image_size": 96},
        "optim": {"lr": 0.01},
        "data": {"preprocess": {"contrast": "clahe"}},
    }
    sets = parse_sets(["optim.lr=1e-4", "data.preprocess.margin=0.1"])
    cfg = resolve(TrainConfig, [("teacher", teacher), ("r.yaml", recipe), ("--set", sets)])
    assert cfg.model.members == ("resnet18",) and cfg.model.image_size == 96
    assert cfg.optim.lr == 1e-4
    assert (cfg.data.preprocess.contrast, cfg.data.preprocess.margin) == ("clahe", 0.1)
    flat = flatten(cfg.to_dict())
    assert flat["optim.loss.name"] == "bce" and flat["data.preprocess.contrast"] == "clahe"
    assert resolve(TrainConfig, [("again", flat)]) == cfg
    with pytest.raises(UserError, match=r"^teacher: unknown key model\.memberz"):
        resolve(TrainConfig, [("teacher", {"model.memberz": ["x"]}), ("r.yaml", recipe)])
    with pytest.raises(UserError, match=r"^--set: epochs: expected int"):
        resolve(TrainConfig, [("r.yaml", recipe), ("--set", {"epochs": "many"})])
    with pytest.raises(UserError, match=r"^r\.yaml \+ x: enhance\.op: 'blur' is not one of"):
        resolve(TrainConfig, [("r.yaml", {"enhance.op": "blur"}), ("x", {})])
    with pytest.raises(UserError, match=r"--set 'optim\.lr': expected KEY=VALUE"):
        parse_sets(["optim.lr"])
    # the held dataclasses' own checks name the layers and the section
    with pytest.raises(UserError, match=r"^r\.yaml: data\.preprocess: .*'contrast' must be one of"):
        resolve(TrainConfig, [("r.yaml", {"data.preprocess.contrast": "blur"})])
    with pytest.raises(UserError, match=r"^r\.yaml: model: unknown head 'x'"):
        resolve(TrainConfig, [("r.yaml", {"model.head": "x"})])


def test_the_config_holds_the_model_preprocess_and_augment_dataclasses():
    from fundus_edge.models import EnsembleConfig
    from fundus_edge.preprocess import PreprocessConfig
    from fundus_edge.torchdata import AugmentConfig

    cfg = load_config(None, {"model.image_size": 96, "enhance.op": "none", "data.rotate": 5.0})
    assert isinstance(cfg.model, EnsembleConfig)
    assert cfg.data.preprocess == PreprocessConfig(size=96)  # size follows model.image_size
    assert cfg.data.augment == AugmentConfig(rotate=5.0)  # the old key, moved
    ens = cfg.ensemble_config(["a", "b"])
    assert ens.views == "original" and ens.num_classes == 2 and ens.label_names == ("a", "b")
    assert ens.members == cfg.model.members and ens.image_size == 96
    # one set of defaults: the dataclasses' own
    assert load_config().model == EnsembleConfig() and load_config().data.augment == AugmentConfig()
    saved = cfg.to_dict()
    assert "num_classes" not in saved["model"] and "size" not in saved["data"]["preprocess"]
    assert "rotate" not in saved["data"] and saved["data"]["augment"]["rotate"] == 5.0
    with pytest.raises(UserError, match=r"^--set: model\.views: set by enhance\.op"):
        load_config(None, sets=["model.views=original"])
    with pytest.raises(UserError, match=r"data\.rotate and data\.augment\.rotate both given"):
        load_config(None, {"data.rotate": 5.0, "data.augment.rotate": 4.0})
    with pytest.raises(UserError, match=r"data\.preprocess\.size 64 differs from model\.image_"):
        load_config(None, {"model.image_size": 96, "data.preprocess.size": 64})
    assert load_config(None, {"model.image_size": 64, "data.preprocess.size": 64}) == load_config(
        None, {"model.image_size": 64}
    )


#: A run's config.yaml as written before the config held the dataclasses (2026-12-01).
OLD_CONFIG_YAML = """\
name: old
out: runs/old
seed: 0
device: cpu
epochs: 2
stop_after: null
select: auto
threshold_policy: f1
deterministic: true
model:
  members: [resnet18]
  head: average
  member_head: gap
  weights: none
  imagenet_dir: null
  dropout: 0.2
  image_size: 64
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
enhance: {op: weight, lam: 0.5, theta: 0.5, pad: 0.1, warmup_epochs: 1, train_weights: targets,
  attention: prob_weighted, cam_method: kernel}
data:
  root: /data/x
  format: auto
  preprocess: {contrast: clahe}
  batch_size: 16
  eval_batch_size: 32
  num_workers: 2
  sampler: shuffle
  hflip: 0.5
  vflip: 0.25
  rotate: 10.0
  brightness: 0.1
  contrast: 0.2
  cache: true
  limit: null
optim: {optimizer: adamw, lr: 0.0003, backbone_lr_mult: 0.1, weight_decay: 0.0001, momentum: 0.9,
  warmup_epochs: 1.0, min_lr_ratio: 0.01, schedule: cosine, freeze_epochs: 0, grad_clip: 1.0,
  amp: auto, ema: 0.0, bn_momentum: null}
"""


def test_an_old_run_config_still_loads_and_resaves_in_todays_layout(tmp_path):
    from fundus_edge.config import config_changes, given_keys, save_config

    old = tmp_path / "config.yaml"
    old.write_text(OLD_CONFIG_YAML)
    cfg = load_config(old)
    a = cfg.data.augment
    assert (a.hflip, a.vflip, a.rotate, a.brightness, a.contrast) == (0.5, 0.25, 10.0, 0.1, 0.2)
    assert cfg.data.preprocess.contrast == "clahe" and cfg.data.preprocess.size == 64
    assert cfg.model.members == ("resnet18",) and cfg.model.dropout == 0.2
    assert "data.augment.vflip" in given_keys(old) and "data.vflip" not in given_keys(old)
    save_config(cfg, tmp_path / "new.yaml")
    again = load_config(tmp_path / "new.yaml")
    assert again == cfg and config_changes(cfg, again) == []


def test_memory_format_auto_is_channels_last_on_cpu_only_and_choices_are_checked():
    import torch

    from fundus_edge.config import TrainConfig
    from fundus_edge.errors import UserError
    from fundus_edge.trainer.parts import use_channels_last

    assert use_channels_last("auto", torch.device("cpu"))
    assert not use_channels_last("auto", torch.device("cuda"))
    assert use_channels_last("channels_last", torch.device("cuda"))
    assert not use_channels_last("contiguous", torch.device("cpu"))
    cfg = TrainConfig.from_dict({"optim": {"memory_format": "nhwc"}})
    with pytest.raises(UserError, match=r"optim\.memory_format"):
        cfg.validate()


def test_bf16_mixed_precision_runs_on_the_cpu_and_fp16_is_refused_there(tiny_cam_ensemble):
    """``optim.amp: bf16`` trains on the CPU under ``torch.autocast("cpu", bfloat16)`` (the
    forward's convolutions in bfloat16, the loss and the update in float32); fp16 on the CPU
    is one clear line."""
    import torch

    from fundus_edge.config import OptimSection
    from fundus_edge.errors import UserError
    from fundus_edge.trainer.optim import Optimisation

    net = tiny_cam_ensemble(("a", "b")).train()
    x = torch.randn(2, 3, 64, 64)
    opt = Optimisation(OptimSection(amp="bf16", lr=1e-2), net, torch.device("cpu"))
    with opt.autocast():
        out = net(x)["logits"]
    assert out.dtype == torch.bfloat16
    before = [p.detach().clone() for p in net.parameters()]
    opt.update(out.float().square().mean(), lambda what, v: AssertionError(what))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    with pytest.raises(UserError, match=r"optim\.amp=fp16.*CUDA"):
        Optimisation(OptimSection(amp="fp16"), net, torch.device("cpu"))
    off = Optimisation(OptimSection(amp="auto"), net, torch.device("cpu"))
    with off.autocast():
        assert net(x)["logits"].dtype == torch.float32
