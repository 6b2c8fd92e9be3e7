"""``fundus-edge distill``: a compact student learns the ensemble's labels, maps and attention."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli import train_options as opts
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
    out: Path | None = opts.OUT,
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML recipe (training/distill-*.yaml); options below override it.",
    ),
    name: str | None = opts.NAME,
    epochs: int | None = opts.EPOCHS,
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
    batch_size: int | None = opts.BATCH_SIZE,
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    seed: int | None = opts.SEED,
    device: str | None = opts.DEVICE,
    workers: int | None = opts.WORKERS,
    stop_after: int | None = opts.STOP_AFTER,
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Any config key, distill section included: --set distill.map_weight=2 "
        "--set optim.lr=1e-3.",
    ),
    resume: bool = opts.RESUME,
    overwrite: bool = opts.OVERWRITE,
    logger: str = opts.LOGGER,
    logger_dir: Path | None = opts.LOGGER_DIR,
    logger_images: int = opts.LOGGER_IMAGES,
) -> None:
    """Distil a compact student (one registry member with CAM kernels) from a trained ensemble.

    The student learns the teacher's soft labels at a temperature, its per-label class maps and
    its attention, plus the ground truth; export, run, eval and bench take it as they take the
    ensemble. Its checkpoint names its teacher (file, SHA-256).
    """
    from fundus_edge.errors import UserError

    # The workstation's extra and the tracker's, checked before any work (exit 3 naming it).
    opts.check_training_install(logger, logger_images)
    if data is not None and not data.exists():
        raise UserError(f"--data {data}: dataset folder does not exist")
    if teacher is not None and not teacher.is_file():
        raise UserError(f"--teacher {teacher}: checkpoint not found")
    if unlabelled is not None and not unlabelled.is_dir():
        raise UserError(f"--unlabelled {unlabelled}: no such folder")
    overrides = opts.config_overrides(
        {
            "distill.teacher": str(teacher) if teacher is not None else None,
            "distill.unlabelled": str(unlabelled) if unlabelled is not None else None,
            "distill.temperature": temperature,
            "distill.init": init,
            "enhance.op": None if passes is None else ("none" if passes else "weight"),
        },
        data=data,
        members=student,
        weights=weights,
        image_size=image_size,
        out=out,
        name=name,
        epochs=epochs,
        batch_size=batch_size,
        workers=workers,
        lr=lr,
        seed=seed,
        device=device,
        stop_after=stop_after,
    )
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
