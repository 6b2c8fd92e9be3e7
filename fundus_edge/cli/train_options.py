"""Options and checks that ``train`` and ``distill`` share: one declaration each, so the two
commands cannot drift (same names, same help, same defaults)."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["check_training_install", "config_overrides", "run_options"]

OUT = typer.Option(None, "--out", "-o", help="Run directory (default runs/NAME).")
NAME = typer.Option(None, "--name", help="Run name (default from the recipe).")
EPOCHS = typer.Option(None, "--epochs", help="Total epochs.")
BATCH_SIZE = typer.Option(None, "--batch-size", help="Training batch size.")
SEED = typer.Option(None, "--seed", help="Random seed.")
DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N.")
WORKERS = typer.Option(None, "--workers", help="DataLoader worker processes.")
STOP_AFTER = typer.Option(None, "--stop-after", help="Stop (resumably) after this many epochs.")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --out.")
LOGGER = typer.Option(
    "none",
    "--logger",
    help="Experiment tracking: none | tensorboard | mlflow (extras of the same names).",
)
LOGGER_DIR = typer.Option(
    None,
    "--logger-dir",
    help="TensorBoard log root or MLflow store folder [RUN/tensorboard, RUN/mlflow; "
    "with --ablation OUT/tensorboard, OUT/mlflow].",
)
LOGGER_IMAGES = typer.Option(
    4, "--logger-images", help="Validation images whose maps are logged each epoch."
)


def check_training_install(logger: str, logger_images: int) -> None:
    """The workstation's extra and the tracker's, checked before any work (exit 3 naming the
    extra); a negative ``--logger-images`` is a user error."""
    from fundus_edge.errors import UserError, require_all
    from fundus_edge.tracking import require_tracker

    require_all(
        [
            ("torch", "training"),
            ("torchvision", "training"),
            ("safetensors", "training checkpoints"),
            ("matplotlib", "the training curves"),
        ]
    )
    require_tracker(logger)
    if logger_images < 0:
        raise UserError(f"--logger-images {logger_images}: must be 0 or more")


def run_options(
    *,
    out: Path | None,
    name: str | None,
    epochs: int | None,
    batch_size: int | None,
    workers: int | None,
    lr: float | None,
    seed: int | None,
    device: str | None,
    stop_after: int | None,
) -> dict:
    """The config keys the shared options set (``None``: not given on the command line)."""
    return {
        "out": str(out) if out is not None else None,
        "name": name,
        "epochs": epochs,
        "data.batch_size": batch_size,
        "data.num_workers": workers,
        "optim.lr": lr,
        "seed": seed,
        "device": device,
        "stop_after": stop_after,
    }


def config_overrides(
    specific: dict,
    *,
    data: Path | None,
    members: str | None,
    weights: str | None,
    image_size: int | None,
    **run: object,
) -> dict:
    """The dotted config keys a ``train`` or ``distill`` command line sets: the data folder,
    the members (``a,b``), the initial weights, the input size, the :func:`run_options`
    (``run``: ``out``, ``name``, ``epochs`` ...) and the command's own ``specific`` keys.
    Options not given (``None``) are left out, so the recipe's values stand."""
    pairs = {
        "data.root": str(data) if data is not None else None,
        "model.members": [m.strip() for m in members.split(",") if m.strip()] if members else None,
        "model.weights": weights,
        "model.image_size": image_size,
        **run_options(**run),  # type: ignore[arg-type]
        **specific,
    }
    return {k: v for k, v in pairs.items() if v is not None}
