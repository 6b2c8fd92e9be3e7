"""Ablation runs: the paper table, spec resolution and errors, and reruns that never mix old and
new results (overwrite interrupted part-way, resume after an interruption)."""

from __future__ import annotations

import json
import logging
import os

import pytest

pytest.importorskip("torch", reason="torch is not installed (extra: train)")
pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")
pytest.importorskip("safetensors", reason="safetensors is not installed (extra: train)")

import fundus_edge.ablation as ablation
from fundus_edge.ablation import ABLATION_COLUMNS, ablation_configs, run_ablation
from fundus_edge.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# resnet18 at 48 px, one epoch, no pretrained weights: a few seconds per variant on two cores.
TINY = {
    "model.members": ["resnet18"],
    "model.member_head": "gap",
    "model.weights": "none",
    "model.image_size": 48,
    "data.batch_size": 4,
    "data.num_workers": 0,
    "device": "cpu",
    "epochs": 1,
    "seed": 3,
    "enhance.op": "none",
    "optim.ema": 0.0,
}


def _tiny(data_dir, **extra) -> dict:
    return {**TINY, "data.root": str(data_dir), **extra}


def _spec(tmp_path, body: str, name: str = "abl.yaml"):
    spec = tmp_path / name
    spec.write_text(body)
    return spec


def test_ablation_writes_the_paper_table(tiny_synth, tmp_path):
    spec = _spec(
        tmp_path,
        "variants:\n"
        "  solo: {model.members: [$2], enhance.op: none}\n"
        "  fusion_cam: {model.head: fusion, enhance.op: weight, enhance.warmup_epochs: 0}\n",
    )
    out = tmp_path / "abl"
    opts = _tiny(tiny_synth, **{"model.members": ["resnet18", "mobilenet_v3_large"]})
    res = run_ablation(spec, None, opts, [], out)
    table = json.loads((out / "ablation.json").read_text())
    assert table["split"] == res["split"] == "test"
    assert list(table["columns"]) == list(ABLATION_COLUMNS)
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["solo", "fusion_cam"]
    assert rows["solo"]["members"] == "mobilenet_v3_large" and rows["solo"]["enhance"] == "none"
    assert rows["solo"]["head"] == "gap"  # the member's own head when alone
    assert rows["fusion_cam"]["members"] == "resnet18+mobilenet_v3_large"
    assert rows["fusion_cam"]["head"] == "fusion" and rows["fusion_cam"]["enhance"] == "weight"
    for r in rows.values():
        for key in ("accuracy", "precision", "recall", "macro_auroc", "map", "macro_f1"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0, key
        assert r["params_m"] > 0.1 and r["train_time_s"] > 0 and r["epochs"] == 1
        assert os.path.isfile(r["checkpoint"])
    assert rows["fusion_cam"]["params_m"] > rows["solo"]["params_m"]
    md = (out / "ablation.md").read_text()
    assert "accuracy (element-wise)" in md and "Disease_Risk AUROC" in md
    assert md.count("\n| ") == 3  # header + 2 rows


def test_ablation_spec_resolves_for_both_recipes(tmp_path):
    spec = os.path.join(REPO, "training", "ablation.yaml")
    demo = dict(ablation_configs(spec, None, {}, [], tmp_path))
    paper = dict(
        ablation_configs(spec, os.path.join(REPO, "training", "rfmid-paper.yaml"), {}, [], tmp_path)
    )
    assert list(demo) == list(paper) == [
        "member1", "member1_cam", "member2", "member2_cam", "ensemble", "ensemble_cam",
        "ensemble_cam_fusion",
    ]  # fmt: skip
    assert paper["member1"].model.members == ("vgg19",) and paper["member1"].enhance.op == "none"
    assert paper["member2_cam"].model.members == ("resnet50",)
    assert paper["member2_cam"].enhance.op == "weight"
    assert paper["ensemble_cam_fusion"].model.head == "fusion"
    assert demo["ensemble"].model.members == demo["ensemble_cam"].model.members
    assert len(demo["ensemble"].model.members) == 2
    assert demo["member1"].out == str(tmp_path / "member1")
    bad = _spec(tmp_path, "variants:\n  third: {model.members: [$3]}\n", "bad.yaml")
    with pytest.raises(UserError, match=r"variants\.third: '\$3': the base config has 2"):
        ablation_configs(bad, os.path.join(REPO, "training", "demo-cpu.yaml"), {}, [], tmp_path)


@pytest.mark.parametrize(
    "name", ['""', '"a/b"', '"a\\\\b"', '"."', '".."', '".hidden"', '"  "', "ablation.md"]
)
def test_variant_names_must_be_plain(tmp_path, name):
    spec = _spec(tmp_path, f"variants:\n  ok: {{}}\n  {name}: {{}}\n")
    with pytest.raises(UserError, match=r"abl\.yaml: variants: .*not a plain name") as exc:
        ablation_configs(spec, None, {}, [], tmp_path / "out")
    assert "\n" not in str(exc.value)
    # Nothing escapes --out, nothing is created at all.
    with pytest.raises(UserError):
        run_ablation(spec, None, {}, [], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()


def test_empty_variants_and_bad_base_name_the_spec(tmp_path):
    empty = _spec(tmp_path, "variants: {}\n", "empty.yaml")
    with pytest.raises(UserError, match=r"empty\.yaml: variants: empty"):
        run_ablation(empty, None, {}, [], tmp_path / "out")
    nobase = _spec(tmp_path, "base: nope.yaml\nvariants:\n  a: {}\n", "nobase.yaml")
    with pytest.raises(UserError, match=r"nobase\.yaml: base: nope\.yaml: no such file") as exc:
        ablation_configs(nobase, None, {}, [], tmp_path / "out")
    assert "--config" not in str(exc.value)
    # --config given on the command line is still blamed as --config.
    with pytest.raises(UserError, match=r"--config .*missing\.yaml: no such file"):
        ablation_configs(nobase, tmp_path / "missing.yaml", {}, [], tmp_path / "out")
    with pytest.raises(UserError, match="exclude each other"):
        run_ablation(nobase, None, {}, [], tmp_path / "out", overwrite=True, resume=True)


def test_log_line_names_the_head_the_table_shows(tmp_path, monkeypatch):
    spec = _spec(tmp_path, "variants:\n  solo: {model.members: [resnet18]}\n")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    def stop(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation, "train", stop)
    handler = Keep(level=logging.INFO)
    old_level = ablation.log.level
    ablation.log.addHandler(handler)
    ablation.log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the cache
    try:
        with pytest.raises(KeyboardInterrupt):
            run_ablation(spec, None, {"model.member_head": "native"}, [], tmp_path / "out")
    finally:
        ablation.log.removeHandler(handler)
        ablation.log.setLevel(old_level)
    line = next(r for r in records if "ablation variant solo" in r)
    assert "head native" in line and "average" not in line


def test_overwrite_refuses_a_foreign_directory_before_deleting_anything(tmp_path):
    spec = _spec(tmp_path, "variants:\n  a: {}\n  b: {}\n")
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "config.yaml").write_text("name: a\n")
    (out / "b").mkdir()
    (out / "b" / "notes.txt").write_text("mine")
    (out / "ablation.md").write_text("old table\n")
    with pytest.raises(UserError, match=r"b: not a fundus-edge run directory"):
        run_ablation(spec, None, {}, [], out, overwrite=True)
    assert (out / "ablation.md").read_text() == "old table\n"
    assert (out / "a" / "config.yaml").is_file() and (out / "b" / "notes.txt").is_file()


def test_rerun_overwrite_interrupted_then_resume(tiny_synth, tmp_path, monkeypatch):
    spec = _spec(tmp_path, "variants:\n  a: {}\n  b: {epochs: 2}\n  c: {optim.lr: 0.001}\n")
    out = tmp_path / "out"
    opts = _tiny(tiny_synth)
    real_train = ablation.train
    calls: list[tuple[str, bool, bool]] = []

    def counting(cfg, resume=False, overwrite=False, **kw):
        calls.append((cfg.name, resume, overwrite))
        return real_train(cfg, resume=resume, overwrite=overwrite, **kw)

    monkeypatch.setattr(ablation, "train", counting)
    first = run_ablation(spec, None, opts, [], out)
    assert [c[0] for c in calls] == ["a", "b", "c"]
    assert [r["epochs"] for r in first["rows"]] == [1, 2, 1]
    old_c_best = (out / "c" / "best.safetensors").read_bytes()

    # Neither flag: one line naming the existing work, nothing touched.
    with pytest.raises(UserError, match=r"pass --resume .* or --overwrite") as exc:
        run_ablation(spec, None, opts, [], out)
    assert "\n" not in str(exc.value)
    assert (out / "c" / "best.safetensors").read_bytes() == old_c_best

    # --overwrite whose first variant fails to start (data, weights): nothing old is deleted.
    def failing_start(cfg, **kw):
        raise UserError("ImageNet weights for resnet18 not found")

    monkeypatch.setattr(ablation, "train", failing_start)
    with pytest.raises(UserError, match="ImageNet weights"):
        run_ablation(spec, None, opts, [], out, overwrite=True)
    assert (out / "ablation.md").is_file() and (out / "ablation.json").is_file()
    assert (out / "c" / "best.safetensors").read_bytes() == old_c_best

    # --overwrite interrupted in the second variant (after one epoch of its two): the old
    # table and old later variants are gone; only new, resumable work is left.
    def interrupted(cfg, resume=False, overwrite=False, **kw):
        calls.append((cfg.name, resume, overwrite))
        if cfg.name == "b":
            cfg.stop_after = 1
            real_train(cfg, resume=resume, overwrite=overwrite, **kw)
            raise KeyboardInterrupt
        return real_train(cfg, resume=resume, overwrite=overwrite, **kw)

    monkeypatch.setattr(ablation, "train", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_ablation(spec, None, opts, [], out, overwrite=True)
    assert [c[0] for c in calls] == ["a", "b"]
    assert not (out / "ablation.md").exists() and not (out / "ablation.json").exists()
    assert not (out / "c").exists()
    assert (out / "a" / "best.safetensors").is_file() and (out / "b" / "last.state.pt").is_file()

    # --resume: a is finished (evaluated only), b continues its second epoch, c starts.
    monkeypatch.setattr(ablation, "train", counting)
    calls.clear()
    res = run_ablation(spec, None, opts, [], out, resume=True)
    assert calls == [("b", True, False), ("c", False, False)]
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["a", "b", "c"]
    assert rows["b"]["epochs"] == 2 and rows["a"]["epochs"] == rows["c"]["epochs"] == 1
    assert all(r["train_time_s"] > 0 for r in rows.values())
    table = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["a", "b", "c"]
    assert (out / "ablation.md").read_text().count("\n| ") == 4

    # A variant whose options changed since it trained is refused, not mislabelled.
    changed = _spec(tmp_path, "variants:\n  a: {optim.lr: 0.5}\n", "changed.yaml")
    with pytest.raises(UserError, match=r"variant a: .*optim\.lr=.*pass --overwrite"):
        run_ablation(changed, None, opts, [], out, resume=True)
