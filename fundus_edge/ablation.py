"""Ablation studies: train every variant of a spec YAML, evaluate each, write one table.

A spec (``training/ablation.yaml``) names a ``base`` recipe and ``variants``, each a mapping
of dotted overrides. :func:`run_ablation` trains ``OUT/<variant>/`` for each (an ordinary run
directory, see :mod:`fundus_edge.trainer`) and writes ``OUT/ablation.md`` and
``OUT/ablation.json``, one row per variant.

Reruns never mix old and new results:

- neither ``resume`` nor ``overwrite``: an existing variant directory or table is refused
  before anything trains;
- ``overwrite``: once the whole spec resolves and every existing variant directory is known to
  be a fundus-edge run, the old table and every variant directory of the spec are deleted as
  the first variant starts (its data and model ready: a start that fails deletes nothing), so
  an interruption leaves only new, resumable work;
- ``resume``: finished variants are evaluated without training, variants with a state file
  continue, the others start; the table is written once every variant has finished.

With a tracker (:class:`AblationTracking`, ``train --ablation --logger tensorboard|mlflow``)
every variant trained here is its own tracker run, named after the variant, logged as a single
run is (:class:`~fundus_edge.tracking.callback.TrackingCallback`), all under one log root
(default ``OUT/tensorboard`` or ``OUT/mlflow``) so the variants sit side by side. ``resume``
continues each variant's own tracker run; a finished variant is not logged again. Once the table
is written, a run named ``ablation`` in the same root gets the table's numbers (one metric per
column and variant, ``<column>/<variant>``) and ``ablation.md`` / ``ablation.json`` as artifacts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fundus_edge.config import TrainConfig
from fundus_edge.errors import UserError
from fundus_edge.fileio import atomic_write_json, atomic_write_text
from fundus_edge.log import get_logger
from fundus_edge.options import load_yaml_mapping
from fundus_edge.trainer import STATE_FILE, resolve_device, train
from fundus_edge.trainer.state import RUN_MARKER, check_run_dir

__all__ = ["ABLATION_COLUMNS", "AblationTracking", "ablation_configs", "run_ablation"]

log = get_logger("ablation")

_ABLATION_KEYS = {"base", "variants", "description"}
_TABLE_FILES = ("ablation.md", "ablation.json")
#: The name of the tracker run that holds the table (never a variant name: see _variant_name).
TABLE_RUN = "ablation"
# Names a variant cannot take: the default log roots in --out, the table's tracker run and its
# record (fundus_edge.tracking.RECORD_FILE).
_RESERVED_NAMES = {"tensorboard", "mlflow", TABLE_RUN, "tracking.json"}
# Keys a resumed run may differ in from its saved config (train(resume=True) takes these from
# the command line); any other difference means the variant is no longer what was trained.
_RESUME_FREE_KEYS = {"epochs", "stop_after", "device", "out", "data.num_workers", "data.root"}

#: Ablation table columns: key -> Markdown header (the paper's three first).
ABLATION_COLUMNS = {
    "variant": "variant",
    "members": "members",
    "head": "head",
    "enhance": "CAM enhancement",
    "accuracy": "accuracy (element-wise)",
    "precision": "precision (element-wise)",
    "recall": "recall (element-wise)",
    "macro_auroc": "macro AUROC",
    "map": "mAP",
    "macro_f1": "macro F1",
    "screening_auroc": "Disease_Risk AUROC",
    "params_m": "params (M)",
    "train_time_s": "train time (s)",
}


@dataclass(frozen=True)
class AblationTracking:
    """How an ablation's variants are tracked (``train --ablation --logger``).

    Attributes:
        kind: ``tensorboard`` or ``mlflow`` (``none``: nothing is tracked).
        logger_dir: the one log root every variant logs under; None: ``OUT/tensorboard`` or
            ``OUT/mlflow`` (not each variant's run directory, so the runs sit side by side).
        images: validation images whose maps each variant logs every epoch (0: none).
    """

    kind: str
    logger_dir: Path | None = None
    images: int = 4

    def root(self, out_dir: Path) -> Path:
        """The log root: ``logger_dir``, else the kind's folder in the ablation's ``out_dir``."""
        from fundus_edge.tracking import default_logger_dir

        return (
            Path(self.logger_dir)
            if self.logger_dir is not None
            else default_logger_dir(self.kind, out_dir)
        )

    def old_logs(self, out_dir: Path, names: list[str]) -> list[Path]:
        """What ``overwrite`` deletes: the variants' (and the table run's) TensorBoard folders
        under the default root, which would otherwise mix old events with new ones. An
        explicit ``logger_dir`` is the user's and is left alone; an MLflow store keeps every
        run it was given (the old ones stay, finished or failed, beside the new)."""
        if self.kind != "tensorboard" or self.logger_dir is not None:
            return []
        root = self.root(out_dir)
        return [root / n for n in [*names, TABLE_RUN]]


def _substitute_members(value: Any, base_members: list[str], where: str) -> Any:
    """``[$1]`` -> the base recipe's first member: one spec serves any pair of backbones."""
    if not isinstance(value, list):
        return value
    out = []
    for item in value:
        if isinstance(item, str) and item.startswith("$"):
            try:
                k = int(item[1:])
            except ValueError:
                raise UserError(
                    f"{where}: {item!r}: expected $1, $2, ... (a base member)"
                ) from None
            if not 1 <= k <= len(base_members):
                raise UserError(
                    f"{where}: {item!r}: the base config has {len(base_members)} member(s) "
                    f"({', '.join(base_members)})"
                )
            item = base_members[k - 1]
        out.append(item)
    return out


def _variant_name(name: Any, spec_path: Path) -> str:
    """A variant name is one plain path component: its run directory stays inside ``out_dir``."""
    if isinstance(name, bool) or not isinstance(name, str | int):
        raise UserError(f"{spec_path}: variants: {name!r}: a variant name must be a string")
    s = str(name)
    if (
        not s.strip()
        or "/" in s
        or "\\" in s
        or s.startswith(".")
        or "\0" in s
        or s in _TABLE_FILES
        or s in _RESERVED_NAMES
    ):
        raise UserError(
            f"{spec_path}: variants: {s!r}: not a plain name (no '/', '\\', leading '.', "
            f"table file name, or one of {', '.join(sorted(_RESERVED_NAMES))}); it names the "
            "variant's directory in --out and its tracker run"
        )
    return s


def _head(cfg: TrainConfig) -> str:
    """The head a variant trains: the ensemble head, or the member's own head when alone."""
    return cfg.model.head if len(cfg.model.members) > 1 else cfg.model.member_head


def ablation_configs(
    spec_path: str | os.PathLike,
    base_config: str | os.PathLike | None,
    overrides: dict,
    sets: list[str],
    out_dir: Path,
) -> list[tuple[str, TrainConfig]]:
    """The resolved config of every variant an ablation YAML lists (nothing is trained).

    The YAML: ``base`` (a recipe path relative to the YAML; ``base_config`` wins when given)
    and ``variants``, a non-empty mapping of variant name -> dotted overrides
    (``enhance.op: none``). In ``model.members`` lists, ``$1``, ``$2`` name the base config's
    members, so one spec ablates whichever pair the base trains. Command-line
    ``overrides``/``sets`` apply to the base (every variant), the variant's own overrides
    after them. Variant ``name`` trains into ``out_dir/name``.

    Args:
        spec_path: the ablation YAML.
        base_config: a recipe replacing the spec's ``base`` (``--config``), or None.
        overrides: dotted keys -> values (the command's named options).
        sets: ``KEY=VALUE`` strings (``--set``).
        out_dir: the directory holding the variants' run directories.

    Returns:
        ``[(variant name, config), ...]`` in the spec's order.

    Raises:
        UserError: missing or malformed spec, unknown key, no variants, a variant name that is
            not a plain name, a missing ``base`` file, a bad variant.
    """
    from fundus_edge.config import apply_overrides, load_config

    spec_path = Path(spec_path)
    spec = load_yaml_mapping(spec_path, "--ablation")
    if not isinstance(spec.get("variants"), dict):
        raise UserError(f"{spec_path}: expected 'variants:' mapping name -> overrides")
    unknown = sorted(set(spec) - _ABLATION_KEYS)
    if unknown:
        raise UserError(f"{spec_path}: unknown key {unknown[0]!r} (known: base, variants)")
    if not spec["variants"]:
        raise UserError(f"{spec_path}: variants: empty; list at least one variant to train")
    names = [_variant_name(n, spec_path) for n in spec["variants"]]
    base = base_config
    if base is None and spec.get("base"):
        base = spec_path.parent / str(spec["base"])
        if not base.is_file():
            # Named as the spec's key: load_config would blame --config, which was not given.
            raise UserError(f"{spec_path}: base: {spec['base']}: no such file (looked at {base})")
    base_cfg = load_config(base, overrides, sets=sets)
    out = []
    for name, var in zip(names, spec["variants"].values(), strict=True):
        where = f"{spec_path}: variants.{name}"
        if not isinstance(var, dict):
            raise UserError(f"{where}: expected a mapping of overrides")
        var = {k: _substitute_members(v, base_cfg.model.members, where) for k, v in var.items()}
        d = apply_overrides(base_cfg.to_dict(), {**var, "out": str(out_dir / name), "name": name})
        cfg = TrainConfig.from_dict(d, where)
        cfg.validate(where)
        out.append((name, cfg))
    return out


def _check_same_config(name: str, cfg: TrainConfig, run_dir: Path) -> None:
    """A resumed or reused variant must still be what the spec asks for (else its row lies)."""
    from fundus_edge.config import config_changes, load_config

    changes = config_changes(load_config(run_dir / RUN_MARKER), cfg, keep=_RESUME_FREE_KEYS)
    if changes:
        key, was, now = changes[0]
        raise UserError(
            f"ablation variant {name}: {run_dir} was trained with {key}={was!r}, "
            f"the spec and options now give {now!r}; pass --overwrite to retrain"
        )


def _plan(
    variants: list[tuple[str, TrainConfig]], out_dir: Path, resume: bool, overwrite: bool
) -> dict[str, str]:
    """Check every variant directory before anything is deleted or trained.

    Returns:
        variant name -> ``"fresh"`` (start a run), ``"restart"`` (a run directory that never
        saved a state: nothing to lose, start again), ``"resume"`` (continue from the state
        file) or ``"done"`` (all epochs finished: evaluate only).
    """
    tables = [out_dir / f for f in _TABLE_FILES if (out_dir / f).exists()]
    if tables and not (resume or overwrite):
        raise UserError(
            f"{tables[0]}: an ablation table exists; pass --resume to continue the ablation or "
            "--overwrite to replace it"
        )
    plan = {}
    for name, cfg in variants:
        run_dir = Path(cfg.out)
        exists = run_dir.exists() and any(run_dir.iterdir())
        if not resume:
            # Refuses an existing run without --overwrite, and a non-run directory with it.
            check_run_dir(run_dir, resume=False, overwrite=overwrite)
            plan[name] = "fresh"
        elif not exists:
            plan[name] = "fresh"
        elif not (run_dir / STATE_FILE).is_file():
            if not (run_dir / RUN_MARKER).is_file():
                raise UserError(
                    f"{run_dir}: not a fundus-edge run directory (no {RUN_MARKER}); refusing "
                    f"to train ablation variant {name} into it"
                )
            plan[name] = "restart"
        else:
            _check_same_config(name, cfg, run_dir)
            plan[name] = "done" if _finished(cfg, run_dir) else "resume"
    return plan


def _finished(cfg: TrainConfig, run_dir: Path) -> bool:
    """The state file (written first after every epoch) says no epoch is left to train.

    ``train(resume=True)`` would run epochs ``state["epoch"] .. cfg.epochs - 1`` (and stop at
    ``stop_after``); a mid-epoch interruption saves ``step > 0`` with the unfinished epoch.
    """
    st = _load_state(run_dir)
    target = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, cfg.stop_after)
    return st["epoch"] >= target and st["step"] == 0


def _load_state(run_dir: Path) -> dict:
    return torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=True)


def _clear(variants: list[tuple[str, TrainConfig]], out_dir: Path, logs: list[Path]) -> None:
    """``overwrite``: the old table first (never left beside new runs) and the record of its
    tracker run, then these variants and the old ``logs`` folders."""
    from fundus_edge.tracking import RECORD_FILE

    for f in (*_TABLE_FILES, RECORD_FILE):
        (out_dir / f).unlink(missing_ok=True)
    for path in [Path(cfg.out) for _, cfg in variants] + logs:
        if path.exists():
            shutil.rmtree(path)


def run_ablation(
    spec_path: str | os.PathLike,
    base_config: str | os.PathLike | None,
    overrides: dict,
    sets: list[str],
    out_dir: Path,
    overwrite: bool = False,
    resume: bool = False,
    split: str = "test",
    tracking: AblationTracking | None = None,
) -> dict:
    """Train every variant of an ablation YAML and write the paper-shaped comparison table.

    Each variant trains into ``out_dir/<variant>``; its best checkpoint is evaluated on
    ``split`` (the validation split when the data has no such split). ``ablation.json`` and
    ``ablation.md`` hold one row per variant with :data:`ABLATION_COLUMNS`: the paper's
    element-wise accuracy / precision / recall at the thresholds tuned on validation, macro
    AUROC, mAP, macro F1, the Disease_Risk AUROC, the parameter count and the training time
    (the sum of the run's epoch times, so a resumed run counts every epoch once).

    Args:
        spec_path: the ablation YAML (see :func:`ablation_configs`).
        base_config: a recipe replacing the spec's ``base``, or None.
        overrides: dotted keys -> values applied to every variant.
        sets: ``KEY=VALUE`` strings applied to every variant.
        out_dir: where the variants' run directories and the tables go.
        overwrite: replace the old table and every variant directory of the spec (deleted once
            the first variant has started), training all variants.
        resume: evaluate finished variants without training, continue interrupted ones, start
            the missing ones.
        split: the evaluation split.
        tracking: log every variant trained here to a tracker, each its own run named after
            the variant under one log root, and the table to a run named ``ablation`` (see
            :class:`AblationTracking`); None: nothing is tracked.

    Returns:
        ``{"rows": [...], "split": str, "table_json": path, "table_md": path}``.

    Raises:
        UserError: a bad spec, ``resume`` with ``overwrite``, an existing variant directory or
            table without either, a resumed variant whose saved config differs from the spec.
        KeyboardInterrupt: Ctrl-C during a variant (its state is saved; rerun with ``resume``).
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    out_dir = Path(out_dir)
    variants = ablation_configs(spec_path, base_config, overrides, sets, out_dir)
    plan = _plan(variants, out_dir, resume, overwrite)
    if tracking is not None and tracking.kind == "none":
        tracking = None
    if tracking is not None:
        from fundus_edge.tracking import require_tracker

        require_tracker(tracking.kind)  # before any work: a missing package is exit 3
    # overwrite: the first variant replaces its own directory and, once it has started, the old
    # table, the other variants' directories and the variants' old TensorBoard folders; until
    # then everything old stays.
    logs = [] if tracking is None else tracking.old_logs(out_dir, [n for n, _ in variants])
    clear_rest = (lambda: _clear(variants[1:], out_dir, logs)) if overwrite else None

    rows = []
    used_split = split
    for name, cfg in variants:
        action = plan[name]
        log.info(
            "ablation variant %s (%s): members %s, head %s, enhance %s",
            name,
            {"fresh": "training", "restart": "training", "resume": "resuming"}.get(
                action, "finished, evaluating only"
            ),
            ",".join(cfg.model.members),
            _head(cfg),
            cfg.enhance.op,
        )
        run_dir = Path(cfg.out)
        if action == "done":  # trained (and tracked) before: evaluated only, not logged again
            history = [dict(r) for r in _load_state(run_dir)["history"]]
        else:
            first = clear_rest if name == variants[0][0] else None
            history = _train_variant(cfg, action, overwrite, first, tracking, out_dir)
        best = run_dir / "best.safetensors"
        if not history or not best.is_file():
            raise UserError(f"ablation variant {name}: no epoch finished, nothing to evaluate")
        row, rep_split = _evaluate(name, cfg, best, history, split)
        if rep_split != split:
            used_split = rep_split
        rows.append(row)

    out_dir.mkdir(parents=True, exist_ok=True)
    table_json = out_dir / "ablation.json"
    table_md = out_dir / "ablation.md"
    atomic_write_json(
        table_json,
        {"spec": str(spec_path), "split": used_split, "columns": ABLATION_COLUMNS, "rows": rows},
    )
    atomic_write_text(table_md, _markdown_table(rows, used_split))
    if tracking is not None:
        _log_table(tracking, out_dir, rows, used_split, spec_path, [table_md, table_json], resume)
    return {"rows": rows, "split": used_split, "table_json": table_json, "table_md": table_md}


def _train_variant(
    cfg: TrainConfig,
    action: str,
    overwrite: bool,
    first: Callable[[], None] | None,
    tracking: AblationTracking | None,
    out_dir: Path,
) -> list[dict]:
    """Train one variant (``first``: the first variant's hook, run once it has started);
    with ``tracking``, inside its own tracker run, closed as failed if training fails.

    Returns:
        The run's epoch records.
    """
    resume = action == "resume"
    overwrite = overwrite or action == "restart"
    if tracking is None:
        return train(cfg, resume=resume, overwrite=overwrite, on_start=first).history
    from fundus_edge.tracking.callback import TrackingCallback

    # The variant's own tracker run (cfg.name is the variant), under the one shared root;
    # resume continues the run its directory's tracking.json names.
    root = tracking.root(out_dir)
    with TrackingCallback(tracking.kind, cfg, root, resume, tracking.images) as cb:

        def on_start() -> None:  # the old work cleared first, then the run opened
            if first is not None:
                first()
            cb.on_start()

        res = train(cfg, resume=resume, overwrite=overwrite, on_start=on_start, callbacks=[cb])
    return res.history


def _log_table(
    tracking: AblationTracking,
    out_dir: Path,
    rows: list[dict],
    split: str,
    spec_path: str | os.PathLike,
    files: list[Path],
    resume: bool,
) -> None:
    """The table as its own tracker run, :data:`TABLE_RUN`, beside the variants' runs: each
    numeric column of each row as the metric ``<column>/<variant>`` (step 1), the spec and
    split as parameters, ``ablation.md`` and ``ablation.json`` as artifacts. ``out_dir``'s
    ``tracking.json`` names that run, so a ``resume`` that rewrites the table logs into it
    again."""
    from fundus_edge.tracking import numeric_metrics, open_tracker

    metrics: dict[str, float] = {}
    for r in rows:
        cols = {c: r.get(c) for c in ABLATION_COLUMNS if c != "variant"}
        metrics.update({f"{c}/{r['variant']}": v for c, v in numeric_metrics(cols).items()})
    root = tracking.root(out_dir)
    with open_tracker(tracking.kind, out_dir, TABLE_RUN, root, resume=resume) as tracker:
        tracker.log_params(
            {
                "spec": str(spec_path),
                "split": split,
                "variants": ",".join(r["variant"] for r in rows),
            }
        )
        tracker.log_metrics(1, metrics)
        for f in files:
            tracker.log_artifact(f)
    log.info("tracking: the table logged as run %r under %s", TABLE_RUN, root)


def _evaluate(
    name: str, cfg: TrainConfig, best: Path, history: list[dict], split: str
) -> tuple[dict, str]:
    """One table row: the best checkpoint on ``split`` (validation when the data lacks it)."""
    from fundus_edge.evaluate import evaluate_model
    from fundus_edge.models import load_checkpoint

    model, _ = load_checkpoint(best)
    device = "cpu" if cfg.device == "cpu" else str(resolve_device(cfg.device))
    try:
        rep = evaluate_model(best, cfg.data.root, split, device=device)
    except UserError:  # the data has no such split: validation figures instead
        split = "val"
        rep = evaluate_model(best, cfg.data.root, "val", device=device)
    e = rep["elementwise"]
    row = {
        "variant": name,
        "members": "+".join(cfg.model.members),
        "head": _head(cfg),
        "enhance": cfg.enhance.op,
        "accuracy": e["accuracy"],
        "precision": e["precision"],
        "recall": e["recall"],
        "macro_auroc": rep["macro"]["auroc"],
        "map": rep["macro"]["ap"],
        "macro_f1": rep["macro"]["f1"],
        "screening_auroc": rep["riadd"]["screening_auroc"],
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "train_time_s": round(sum(float(r.get("time_s", 0.0)) for r in history), 2),
        "epochs": len(history),
        "split": rep["split"],
        "checkpoint": str(best),
    }
    return row, split


def _markdown_table(rows: list[dict], split: str) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cols = list(ABLATION_COLUMNS)
    lines = [
        f"Ablation on the {split} split (thresholds tuned on validation).",
        "",
        "| " + " | ".join(ABLATION_COLUMNS[c] for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
