"""``fundus-edge train`` and ``fundus-edge eval``."""

from __future__ import annotations

from pathlib import Path

import typer

from fundus_edge.cli import train_options as opts
from fundus_edge.cli.app import app

_ENHANCE = ("weight", "crop", "drop", "none")


@app.command()
def train(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="YAML recipe (training/*.yaml); options below override it."
    ),
    data: Path | None = typer.Option(None, "--data", "-d", help="Dataset folder."),
    out: Path | None = opts.OUT,
    name: str | None = opts.NAME,
    epochs: int | None = opts.EPOCHS,
    members: str | None = typer.Option(
        None, "--members", help="Comma-separated backbones, e.g. vgg19,resnet50."
    ),
    weights: str | None = typer.Option(None, "--weights", help="imagenet | none | PATH."),
    enhance: str | None = typer.Option(None, "--enhance", help="weight | crop | drop | none."),
    head: str | None = typer.Option(None, "--head", help="average | fusion."),
    member_head: str | None = typer.Option(None, "--member-head", help="native | gap."),
    cam_method: str | None = typer.Option(
        None, "--cam-method", help="kernel (fast) or a grad-cam method: gradcam, gradcam++, ..."
    ),
    image_size: int | None = typer.Option(None, "--image-size", help="Model input side."),
    batch_size: int | None = opts.BATCH_SIZE,
    lr: float | None = typer.Option(None, "--lr", help="Head learning rate."),
    seed: int | None = opts.SEED,
    device: str | None = opts.DEVICE,
    workers: int | None = opts.WORKERS,
    stop_after: int | None = opts.STOP_AFTER,
    set_: list[str] = typer.Option(
        [], "--set", help="Any config key: --set optim.lr=1e-3 --set data.sampler=label_aware."
    ),
    resume: bool = opts.RESUME,
    overwrite: bool = opts.OVERWRITE,
    threshold_policy: str | None = typer.Option(
        None,
        "--threshold-policy",
        help="Thresholds tuned per label on validation: f1 | youden | sens@0.90 | spec@0.95 [f1].",
    ),
    logger: str = opts.LOGGER,
    logger_dir: Path | None = opts.LOGGER_DIR,
    logger_images: int = opts.LOGGER_IMAGES,
    ablation: Path | None = typer.Option(
        None,
        "--ablation",
        help="Train every variant this YAML lists (training/ablation.yaml) and write the "
        "table ablation.md / ablation.json in --out; with --logger each variant is its own "
        "tracker run under one root [OUT/tensorboard, OUT/mlflow], the table a run 'ablation'.",
    ),
) -> None:
    """Train the ensemble (CAM-guided enhancement, weighted losses, resumable runs)."""
    from fundus_edge.config import given_keys, load_config
    from fundus_edge.errors import UserError

    # The workstation's extra and the tracker's, checked before any work (exit 3 naming it).
    opts.check_training_install(logger, logger_images)
    if enhance is not None and enhance not in _ENHANCE:
        raise UserError(f"--enhance {enhance!r}: choose one of {', '.join(_ENHANCE)}")
    overrides = opts.config_overrides(
        {
            "model.head": head,
            "model.member_head": member_head,
            "enhance.op": enhance,
            "enhance.cam_method": cam_method,
            "threshold_policy": threshold_policy,
        },
        data=data,
        members=members,
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
    if threshold_policy is not None:
        from fundus_edge.operating import parse_policy

        parse_policy(threshold_policy)
    if data is not None and not data.exists():
        raise UserError(f"--data {data}: dataset folder does not exist")
    if ablation is not None:
        from fundus_edge.ablation import AblationTracking, run_ablation

        if out is None:
            raise UserError("--ablation needs --out DIR for the runs and the comparison table")
        # Each variant its own tracker run, all under one root (default: in --out, not in
        # each variant's run directory) so that they sit side by side.
        tracking = AblationTracking(logger, logger_dir, logger_images)
        res = run_ablation(
            ablation,
            config,
            overrides,
            set_,
            Path(out),
            overwrite=overwrite,
            resume=resume,
            tracking=tracking,
        )
        typer.echo((Path(res["table_md"])).read_text(encoding="utf-8"))
        typer.echo(
            f"ablation: {len(res['rows'])} runs; tables: {res['table_md']}, {res['table_json']}"
        )
        if logger != "none":
            typer.echo(
                f"tracking: {logger}, a run per variant and the table's run 'ablation' under "
                f"{tracking.root(Path(out))}"
            )
        return
    cfg = load_config(config, overrides, sets=set_)
    given = given_keys(config, overrides, set_)

    from fundus_edge.tracking.callback import TrackingCallback
    from fundus_edge.trainer import train as run_train

    with TrackingCallback(logger, cfg, logger_dir, resume, logger_images) as tracking:
        res = run_train(
            cfg,
            resume=resume,
            overwrite=overwrite,
            given=given,
            on_start=tracking.on_start,
            callbacks=[tracking],
        )
    if res.rank != 0:  # under torchrun only rank 0 reports, as only it wrote the run
        return
    best = "n/a" if res.best_metric is None else f"{res.best_name} {res.best_metric:.4f}"
    state = "stopped (resumable)" if res.stopped_early else "done"
    skipped = "".join(
        f"; {n} unreadable {what} image(s) skipped"
        for n, what in ((res.skipped_images, "training"), (res.val_skipped_images, "validation"))
        if n
    )
    typer.echo(
        f"{state}: {res.epochs_done} epoch(s) in {res.run_dir}; best {best} -> {res.best_path}; "
        f"{res.train_time_s:.0f} s{skipped}"
    )


@app.command("eval")
def eval_(
    model: Path = typer.Option(
        ...,
        "--model",
        "-m",
        help="Checkpoint (.safetensors) or exported model (.onnx, .engine/.plan, .xml).",
    ),
    data: Path = typer.Option(..., "--data", "-d", help="Dataset folder."),
    split: str = typer.Option("test", "--split", help="train | val | test."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the full report here."),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder for roc.png, pr.png, maps.png (needs matplotlib: the plots extra) "
        "[default: beside --json, when matplotlib is installed].",
    ),
    device: str = typer.Option(
        "auto",
        "--device",
        help="PyTorch device for checkpoints: auto | cpu | cuda | cuda:N; OpenVINO device "
        "(CPU, GPU, NPU) with --backend openvino [default auto: the backend's own choice].",
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        help="onnxruntime | openvino | tensorrt | torch [default: by the file's suffix].",
    ),
    precision: str | None = typer.Option(
        None, "--precision", help="OpenVINO compute: fp32 | bf16 | int8 [default: the file's]."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per forward pass."),
    data_format: str = typer.Option("auto", "--format", help="auto | rfmid | odir | csv."),
    threshold_policy: str | None = typer.Option(
        None,
        "--threshold-policy",
        help="Re-tune thresholds per label on --data's validation split: f1 | youden | "
        "sens@0.90 | spec@0.95 [default: the model's thresholds].",
    ),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="Fit a temperature per label on --data's validation split and apply it "
        "(without --threshold-policy the thresholds follow it: decisions do not change).",
    ),
    faithfulness: bool = typer.Option(
        False,
        "--faithfulness",
        help="Deletion/insertion AUC of the maps (kernel, grad-cam from a checkpoint, random) "
        "on each label's positive images, pixels deleted to a blurred copy; and ROAD (grad-cam's "
        "imputer) where torch and grad-cam are installed.",
    ),
    faithfulness_images: int = typer.Option(
        32, "--faithfulness-images", help="Positive images per label for --faithfulness."
    ),
    faithfulness_steps: int = typer.Option(
        16, "--faithfulness-steps", help="Deletion/insertion steps for --faithfulness (>= 2)."
    ),
    faithfulness_road: str = typer.Option(
        "10,20,30,40,50,60,70,80,90",
        "--faithfulness-road",
        help="ROAD percentiles for --faithfulness (grad-cam's; each costs a sparse solve per "
        "map, order and image), or none.",
    ),
) -> None:
    """Evaluate a model on a split: AUROC, AP, F1, RIADD score, localisation, plots.

    An exported model (.onnx, .engine) needs only the edge install: the metrics are numpy.
    """
    import importlib.util

    from fundus_edge.errors import UserError, require
    from fundus_edge.fileio import ensure_writable_dir, ensure_writable_file
    from fundus_edge.log import get_logger

    if split not in ("train", "val", "test"):
        raise UserError(f"--split {split!r}: choose train, val or test")
    if not data.exists():
        raise UserError(f"--data {data}: dataset folder does not exist")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    if threshold_policy is not None:
        from fundus_edge.operating import parse_policy

        parse_policy(threshold_policy)
    road_percentiles: tuple[int, ...] = ()
    if faithfulness:
        from fundus_edge.faithfulness import parse_road_percentiles, validate_options

        validate_options(faithfulness_images, faithfulness_steps)
        road_percentiles = parse_road_percentiles(faithfulness_road)
    plots_dir = out if out is not None else (json_file.parent if json_file is not None else None)
    if out is not None:
        require("matplotlib", purpose="the plots in --out")  # asked for: checked before work
    # Where the results go is checked before the evaluation, not after it.
    if json_file is not None:
        ensure_writable_file(json_file, "--json")
    if out is None and plots_dir is not None and importlib.util.find_spec("matplotlib") is None:
        get_logger("evaluate").warning(
            "plots skipped: matplotlib is not installed (pip install 'fundus-edge[plots]'); "
            "the JSON report is written"
        )
        plots_dir = None
    if plots_dir is not None:
        ensure_writable_dir(plots_dir, "--out" if out is not None else "--json")
    from fundus_edge.evaluate import evaluate_model

    rep = evaluate_model(
        model,
        data,
        split,
        json_file,
        plots_dir,
        device,
        batch_size,
        data_format=data_format,
        backend=backend,
        precision=precision,
        threshold_policy=threshold_policy,
        calibrate=calibrate,
        faithfulness=faithfulness_images if faithfulness else None,
        faithfulness_steps=faithfulness_steps,
        faithfulness_road=road_percentiles if faithfulness else None,
    )
    _render(rep)


def _render(rep: dict) -> None:
    def f(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    m, r, e = rep["macro"], rep["riadd"], rep["elementwise"]
    typer.echo(f"{rep['split']}: {rep['n']} images")
    typer.echo(
        f"  macro AUROC {f(m['auroc'])}  mAP {f(m['ap'])}  macro F1 {f(m['f1'])}  "
        f"micro F1 {f(rep['micro']['f1'])}"
    )
    typer.echo(
        f"  RIADD score {f(r['score'])}  (screening AUROC {f(r['screening_auroc'])}, "
        f"classification {f(r['classification'])})"
    )
    typer.echo(
        f"  element-wise accuracy {f(e['accuracy'])}  precision {f(e['precision'])}  "
        f"recall {f(e['recall'])}"
    )
    loc = rep.get("localisation")
    if loc:
        lm = loc["macro"]
        excluded = (
            f"; global, not averaged: {', '.join(loc['excluded'])}" if loc["excluded"] else ""
        )
        typer.echo(
            f"  localisation: pointing game {f(lm['pointing_game'])} "
            f"(within {loc['tolerance']:.0%} of the FOV: {f(lm['pointing_game_tol'])})  "
            f"energy inside {f(lm['energy_inside'])}{excluded}"
        )
    _render_operating(rep)
    _render_faithfulness(rep)
    for note in rep.get("notes", []):
        typer.echo(f"  note: {note}")
    for key, path in rep.get("figures", {}).items():
        typer.echo(f"  {key}: {path}")


def _render_faithfulness(rep: dict) -> None:
    """Macro deletion/insertion AUC per map method, from ``faithfulness.py``."""
    fa = rep.get("faithfulness")
    if not fa:
        return
    typer.echo(
        f"  faithfulness ({fa['steps']} steps, up to {fa['images_per_label']} positive images "
        "per label, blur baseline; deletion lower / insertion higher is better):"
    )
    for method, r in fa["macro"].items():
        road = (
            f"  ROAD MoRF {r['road_morf']:+.4f} LeRF {r['road_lerf']:+.4f} "
            f"combined {r['road_combined']:+.4f}"
            if "road_combined" in r
            else ""
        )
        typer.echo(
            f"    {method:<8} deletion AUC {r['deletion_auc']:.4f}  "
            f"insertion AUC {r['insertion_auc']:.4f}{road}  ({r['labels']} labels)"
        )
    if fa.get("road"):
        typer.echo(
            "    ROAD: probability change when the most (MoRF, lower is better) or least (LeRF, "
            f"higher is better) relevant pixels are imputed, mean over percentiles "
            f"{', '.join(map(str, fa['road']['percentiles']))}; combined (LeRF - MoRF) / 2"
        )
    for note in fa.get("notes", []):
        typer.echo(f"    note: {note}")


def _render_operating(rep: dict) -> None:
    """Operating points with 95 % intervals, and calibration (ECE), from ``operating.py``."""
    ops = rep.get("operating_points")
    if not ops:
        return

    def ci(r: dict) -> str:
        v, (lo, hi) = r["value"], r["ci"]
        if v is None:
            return "n/a"
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}"

    first = next(iter(ops.values()))
    typer.echo(f"  operating points (thresholds: {first['policy']}; 95% bootstrap intervals):")
    typer.echo(
        f"    {'label':<14} {'thr':>6}  {'sensitivity':<22} {'specificity':<22} "
        f"{'PPV':<22} {'NPV':<22} pos/neg"
    )
    for name, r in ops.items():
        typer.echo(
            f"    {name:<14} {r['threshold']:>6.3f}  {ci(r['sensitivity']):<22} "
            f"{ci(r['specificity']):<22} {ci(r['ppv']):<22} {ci(r['npv']):<22} "
            f"{r['n_pos']}/{r['n_neg']}"
        )
    cal = rep.get("calibration")
    if cal:
        line = f"  calibration: ECE ({cal['bins']} bins, pooled) {cal['before']['pooled']:.4f}"
        if cal.get("after"):
            line += (
                f" -> {cal['after']['pooled']:.4f} with temperature scaling "
                f"({cal['temperature_source']})"
            )
        typer.echo(line)
