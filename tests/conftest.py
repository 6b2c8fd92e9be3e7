"""Shared test fixtures. Tests run on a 2-core CPU: keep torch to the cores we have."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from _models import settle_batchnorm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cli_exe() -> list[str]:
    """The installed console script when present (it is, after `make`), else ``python -m``."""
    exe = Path(sys.executable).with_name("fundus-edge")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fundus_edge"]


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A 24-image synthetic RFMiD-layout set at 96 px with lesion masks (read-only: copy it
    before changing anything)."""
    synth = pytest.importorskip("fundus_edge.synth", reason="fundus_edge.synth is not available")
    root = tmp_path_factory.mktemp("synth") / "data"
    synth.generate_dataset(root, n=24, size=96, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_cam_ensemble():
    """A builder ``labels -> Ensemble``: ResNet18 at output stride 16 and ResNet18 (4x4 and
    2x2 grids at 64 px, so the maps are resampled), pooled heads, seeded random weights and
    real batch statistics from one random batch (else every map is flat); in eval mode."""
    torch = pytest.importorskip("torch", reason="the tiny ensemble needs torch")
    from fundus_edge.models import EnsembleConfig, build_ensemble

    def build(labels: tuple[str, ...]):
        torch.manual_seed(0)
        cfg = EnsembleConfig(
            members=("resnet18_os16", "resnet18"),
            member_head="gap",
            num_classes=len(labels),
            label_names=tuple(labels),
            image_size=64,
        )
        return settle_batchnorm(build_ensemble(cfg), 64)

    return build


def pytest_collection_modifyitems(session, config, items):
    """OpenVINO's tests run last.

    Its CPU plugin keeps worker threads for the life of the process once a model is compiled;
    torch training later in the same process (a SIGINT mid-epoch) crashed beside them. The
    product never mixes the two in one process (run/eval/bench on OpenVINO do not train), so the
    suite keeps them apart in time instead.
    """
    items.sort(key=lambda item: item.path.name == "test_openvino.py")
