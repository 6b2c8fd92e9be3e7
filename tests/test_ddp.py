"""Two-process DistributedDataParallel training on CPU (gloo) launched the way users do it:
``python -m torch.distributed.run --nproc_per_node 2 -m fundus_edge train ...``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (extra: train)")
pytest.importorskip("torchvision", reason="torchvision is not installed (extra: train)")
if not torch.distributed.is_available():
    pytest.skip("torch was built without torch.distributed", allow_module_level=True)


def _read(path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def test_torchrun_two_processes_rank0_writes(tmp_path):
    from fundus_edge.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, n=20, size=64, seed=0, show_progress=False)  # 12 train, 4 val
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(logs), "--redirects", "3",
        "-m", "fundus_edge", "train", "--data", str(data), "--out", str(out),
        "--members", "resnet18", "--member-head", "gap", "--weights", "none",
        "--image-size", "32", "--batch-size", "3", "--epochs", "1", "--workers", "0",
        "--device", "cpu", "--enhance", "weight", "--set", "enhance.warmup_epochs=0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    rank_err = {r: "".join(_read(p) for p in logs.rglob(f"{r}/stderr.log")) for r in (0, 1)}
    rank_out = {r: "".join(_read(p) for p in logs.rglob(f"{r}/stdout.log")) for r in (0, 1)}
    detail = f"{proc.stdout}\n{proc.stderr}\nrank0:\n{rank_err[0]}\nrank1:\n{rank_err[1]}"
    assert proc.returncode == 0, detail

    # Rank 0 logs, validates, reports and writes; rank 1 trains its share silently.
    flat0 = " ".join(rank_err[0].split())
    assert "effective batch size 6 (3 per process x 2 processes" in flat0, detail
    assert "epoch 1/1" in flat0, detail
    assert "done: 1 epoch(s)" in rank_out[0], detail
    assert "epoch 1/1" not in rank_err[1] and not rank_out[1].strip(), detail

    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([
        "best.safetensors", "config.yaml", "last.safetensors", "last.state.pt", "metrics.csv",
        "metrics.jsonl", "training_curves.png",
    ]), files  # fmt: skip
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 1  # one writer: no duplicated records
    assert recs[0]["world_size"] == 2 and recs[0]["effective_batch_size"] == 6
    assert recs[0]["enhance"] is True
    from fundus_edge.models import read_checkpoint_meta

    meta = read_checkpoint_meta(out / "best.safetensors")
    assert meta["train"]["world_size"] == 2 and meta["train"]["effective_batch_size"] == 6
