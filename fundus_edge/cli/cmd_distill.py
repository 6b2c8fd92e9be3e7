"""``fundus-edge distill``: a compact student learns the ensemble's labels, maps and attention."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli.app import app


@app.command()
def distill(
    teacher: Path | None = typer.Option(
        None, "--teacher", "-t", help="Teacher checkpoint (.safetensors from fundus-edge train)."
    ),
    student: str | None = typer.Option(
        None,
        "--student",
        help="Student backbone(s), comma-separated registry names, e.g. mobilenet_v3_large.",
    ),
    data: Path | None = typer.Option(None, "--data", "-d", help="Labelled dataset folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory (default runs/NAME)."),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML recipe (training/distill-*.yaml); options below override it.",
    ),
    name: str | None = typer.Option(None, "--name", help="Run name (default from the recipe)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Total epochs."),
    unlabelled: Path | None = typer.Option(
        None,
        "--unlabelled",
        help="Folder of extra images without labels (any format the readers know), used for "
        "the soft-label, map and attention terms only.",
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Soft-label temperature T (the term is scaled by T^2)."
    ),
    passes: bool | None = typer.Option(
        None,
        "--one-pass/--two-pass",
        help="One forward pass (attention: the probability-weighted map) or two (the enhanced "
        "view too) [default: the recipe's enhance.op].",
    ),
    init: str | None = typer.Option(
        None, "--init", help="auto | teacher | weights: where the student's weights start."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="imagenet | none | PATH (with --init weights, or auto)."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Student input side [default: the teacher's]."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Training batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N."),
    workers: int | None = typer.Option(None, "--workers", help="DataLoader worker processes."),
    stop_after: int | None = typer.Option(
        None, "--stop-after", help="Stop (resumably) after this many epochs."
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Any config key, distill section included: --set distill.map_weight=2 "
        "--set optim.lr=1e-3.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    logger: str = typer.Option(
        "none", "--logger", help="Experiment tracking: none | tensorboard | mlflow (as train)."
    ),
    logger_dir: Path | None = typer.Option(
        None, "--logger-dir", help="TensorBoard log root or MLflow store folder (as train)."
    ),
    logger_images: int = typer.Option(
        4, "--logger-images", help="Validation images whose maps are logged each epoch."
    ),
) -> None:
    """Distil a compact student (one registry member with CAM kernels) from a trained ensemble.

    The student learns the teacher's soft labels at a temperature, its per-label class maps and
    its attention, plus the ground truth; export, run, eval and bench take it as they take the
    ensemble. Its checkpoint names its teacher (file, SHA-256).
    """
    from fundus_edge.errors import UserError, require_all

    require_all(
        [
            ("torch", "training"),
            ("torchvision", "training"),
            ("safetensors", "training checkpoints"),
            ("matplotlib", "the training curves"),
        ]
    )
    from fundus_edge.tracking import require_tracker

    require_tracker(logger)  # exit 3 naming the extra, before any work
    if logger_images < 0:
        raise UserError(f"--logger-images {logger_images}: must be 0 or more")
    if data is not None and not data.exists():
        raise UserError(f"--data {data}: dataset folder does not exist")
    if teacher is not None and not teacher.is_file():
        raise UserError(f"--teacher {teacher}: checkpoint not found")
    if unlabelled is not None and not unlabelled.is_dir():
        raise UserError(f"--unlabelled {unlabelled}: no such folder")
    pairs = {
        "distill.teacher": str(teacher) if teacher is not None else None,
        "distill.unlabelled": str(unlabelled) if unlabelled is not None else None,
        "distill.temperature": temperature,
        "distill.init": init,
        "data.root": str(data) if data is not None else None,
        "out": str(out) if out is not None else None,
        "name": name,
        "epochs": epochs,
        "model.members": [m.strip() for m in student.split(",") if m.strip()] if student else None,
        "model.weights": weights,
        "model.image_size": image_size,
        "enhance.op": None if passes is None else ("none" if passes else "weight"),
        "data.batch_size": batch_size,
        "data.num_workers": workers,
        "optim.lr": lr,
        "seed": seed,
        "device": device,
        "stop_after": stop_after,
    }
    overrides = {k: v for k, v in pairs.items() if v is not None}
    from fundus_edge.distill import distill as run_distill
    from fundus_edge.distill import load_distill_config, student_defaults

    cfg, section = load_distill_config(config, overrides, set_, student_defaults)
    given = _given(config, overrides, set_)
    from fundus_edge.tracking.callback import TrackingCallback

    with TrackingCallback(logger, cfg, logger_dir, resume, logger_images) as tracking:
        res = run_distill(
            cfg,
            section,
            resume=resume,
            overwrite=overwrite,
            given=given,
            on_start=tracking.on_start,
            callbacks=[tracking],
        )
    if res.rank != 0:
        return
    best = "n/a" if res.best_metric is None else f"{res.best_name} {res.best_metric:.4f}"
    state = "stopped (resumable)" if res.stopped_early else "done"
    typer.echo(
        f"{state}: student {'+'.join(cfg.model.members)} distilled for {res.epochs_done} epoch(s) "
        f"in {res.run_dir}; best {best} -> {res.best_path}; {res.train_time_s:.0f} s"
    )


def _given(config: Path | None, overrides: dict, sets: list[str]) -> set[str]:
    """The dotted keys the user chose (recipe, options, ``--set``): on ``--resume`` one that
    differs from the run's is refused instead of ignored."""
    from fundus_edge.config import given_keys

    return given_keys(config, overrides, sets)
